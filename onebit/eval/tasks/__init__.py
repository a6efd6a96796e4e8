"""lm-eval task configs (``onebit_*.yaml``) that read the six zero-shot benchmarks from local files.

The YAMLs name ``onebit.eval.tasks.local_data.load_*`` as their ``custom_dataset``; lm-eval calls it
with the task's ``metadata``, into which :func:`onebit.eval.zeroshot.zero_shot` puts ``data_dir``.
"""
