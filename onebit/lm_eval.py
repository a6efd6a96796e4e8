"""lm-evaluation-harness's command line with the OneBit model types registered:

    python -m onebit.lm_eval run --model hf \\
        --model_args pretrained=outputs/train/runs/<time>/onebit_model,backend=causal \\
        --tasks piqa,arc_easy --batch_size 8

takes every argument of ``lm-eval`` (``run``, ``ls``, ``validate`` and the legacy form without a
command). ``import onebit`` is all it adds, so that lm-eval's stock ``hf`` model loads a 1-bit
export with its packed layers; ``backend=causal`` tells lm-eval what a ``onebit_*`` model type is.
Offline, the paper's six tasks run from local files as ``evaluate.py`` runs them:
``--include_path`` :data:`onebit.eval.zeroshot.TASKS_DIR`, ``--tasks onebit_piqa`` and
``--metadata '{"data_dir": "<dir with piqa/, arc/, ...>"}'``.
"""

from __future__ import annotations

import onebit  # noqa: F401  (registers the onebit quantization and model types)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
