"""Zero-shot accuracy on the OneBit paper's six tasks with lm-evaluation-harness, offline.

The tasks are lm-eval 0.4.13's own (``piqa``, ``hellaswag``, ``arc_easy``, ``arc_challenge``,
``boolq``, ``winogrande``: same prompts, choices, targets and metrics) re-declared as
``onebit_<task>`` in ``onebit/eval/tasks/*.yaml`` with a ``custom_dataset`` hook that reads
``data_dir`` (the ``shared/data`` folder; formats in its README) instead of the Hugging Face Hub.

Scoring, per item with choices c_i and gold g (lm-eval's ``multiple_choice``):
    ll_i     = log p(c_i | prompt)                  (sum over the choice's tokens)
    acc      = [argmax_i ll_i == g]
    acc_norm = [argmax_i ll_i / len_chars(c_i) == g]
and each metric is the mean over items, with stderr = sample std / sqrt(n).
BoolQ and Winogrande declare only ``acc`` in lm-eval, so their ``acc_norm`` is None here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from onebit.errors import OneBitInputError
from onebit.eval.tasks.local_data import check_files

TASKS = ("winogrande", "hellaswag", "piqa", "boolq", "arc_easy", "arc_challenge")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"  # <repo>/../shared/data

# The metric each task contributes to the paper's zero-shot table (the GPTQ / OmniQuant convention
# the OneBit paper follows): acc_norm where length normalization matters (HellaSwag, ARC-c), acc
# elsewhere. BoolQ and Winogrande have only acc in lm-eval.
PAPER_METRIC = {
    "winogrande": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "boolq": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
}

# The paper's column name of each task in its zero-shot table, in the paper's order.
PAPER_COLUMNS = {
    "winogrande": "Wino.",
    "hellaswag": "Hella.",
    "piqa": "PIQA",
    "boolq": "BoolQ",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
}

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    """Sets the HF offline variables for the call and restores the previous values afterwards."""
    saved = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_tasks(tasks: Sequence[str], data_dir: Path | None) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise OneBitInputError(f"Unknown zero-shot task(s) {unknown}; choose from {list(TASKS)}.")
    if data_dir is None:  # lm-eval's own task definitions, data from the Hub
        from onebit.hub import hub_reachable

        if not hub_reachable():
            raise OneBitInputError(
                "zero-shot data from the Hugging Face Hub needs internet, and the Hub is "
                "unreachable; give local copies instead (eval.zero_shot_data_dir=<dir with piqa/, "
                "hellaswag/, arc/, boolq/, winogrande/>)."
            )
        return
    if not data_dir.is_dir():
        raise OneBitInputError(f"Zero-shot data_dir {data_dir} is not a directory.")
    for task in tasks:  # a missing file fails here, with its path, before any model work
        check_files(task, data_dir)


def evaluate_lm(
    lm: Any,
    tasks: Sequence[str] = TASKS,
    data_dir: str | Path | None = DEFAULT_DATA_DIR,
    limit: int | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Runs the local tasks on any lm-eval ``LM`` (an ``HFLM``, or a fake one in tests).

    Returns the same dict as :func:`zero_shot`.
    """
    from lm_eval.evaluator import evaluate  # lazy: heavy
    from lm_eval.tasks import TaskManager

    data_dir = None if data_dir is None else Path(data_dir).expanduser().resolve()
    tasks = list(tasks)
    _check_tasks(tasks, data_dir)
    if data_dir is None:  # online: lm-eval's built-in tasks of the same names
        names = {t: t for t in tasks}
        env, manager_kw = contextlib.nullcontext(), {}
    else:
        names = {t: f"onebit_{t}" for t in tasks}
        env = _offline_env()
        manager_kw = dict(
            include_path=str(TASKS_DIR),
            include_defaults=False,
            metadata={"data_dir": str(data_dir)},
        )
    with env:
        manager = TaskManager(**manager_kw)
        loaded = manager.load([names[t] for t in tasks])
        for task_obj in loaded["tasks"].values():
            task_obj.set_config(key="num_fewshot", value=0)
        out = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False, verbosity="WARNING")
    if out is None:  # non-zero ranks get nothing back
        return {}
    results, n_samples = out["results"], out.get("n-samples", {})
    scores: dict[str, dict[str, float | int | None]] = {}
    for task in tasks:
        res = results[names[task]]
        n = n_samples.get(names[task], {}).get("effective")
        scores[task] = {
            "acc": float(res["acc,none"]),
            "acc_norm": float(res["acc_norm,none"]) if "acc_norm,none" in res else None,
            "acc_stderr": _float_or_none(res.get("acc_stderr,none")),
            "n": int(n) if n is not None else None,
        }
    return scores


def _float_or_none(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it has no stderr
        return None


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = TASKS,
    data_dir: str | Path | None = DEFAULT_DATA_DIR,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Zero-shot accuracy of a loaded causal LM on the paper's tasks, with lm-eval, offline.

    Args:
        model: a loaded Hugging Face causal LM (custom layers such as ``OneBitLinear`` are fine);
            it is put in eval mode and, if ``device`` is given, moved there in place.
        tokenizer: its tokenizer.
        tasks: any of :data:`TASKS`.
        data_dir: the folder with ``piqa/``, ``hellaswag/``, ``arc/``, ``boolq/``, ``winogrande/``;
            None runs lm-eval's built-in tasks on the Hub's data (needs internet).
        limit: at most this many items per task (the first ones), for quick runs; None for all.
        batch_size: lm-eval's batch size.
        device: where to run; None keeps the model's device.

    Returns:
        ``{task: {"acc", "acc_norm", "acc_stderr", "n"}}``; ``acc_norm`` is None for BoolQ and
        Winogrande (lm-eval defines only acc there); ``n`` is the number of items scored.
        :data:`PAPER_METRIC` says which of acc / acc_norm the paper's table reports per task.
    """
    from lm_eval.models.huggingface import HFLM  # lazy: heavy

    data_dir = None if data_dir is None else Path(data_dir).expanduser().resolve()
    _check_tasks(list(tasks), data_dir)
    if limit is not None and limit < 1:
        raise OneBitInputError(f"Zero-shot limit must be a positive number of items, got {limit}.")
    if device is not None:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return evaluate_lm(lm, tasks=tasks, data_dir=data_dir, limit=limit)
