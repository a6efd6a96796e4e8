"""Readers for the local copies of the six zero-shot benchmarks, in the fields lm-eval's tasks use.

Each ``read_*`` returns a list of plain dicts shaped like the Hugging Face dataset that lm-eval's
built-in task reads (``baber/piqa``, ``Rowan/hellaswag`` after ``process_docs``,
``allenai/ai2_arc``, ``aps/super_glue:boolq``, ``allenai/winogrande``), so the ``onebit_*.yaml``
prompts are theirs verbatim. Each ``load_*`` wraps it as the ``custom_dataset`` hook of lm-eval
0.4.13: lm-eval calls it with the task's ``metadata`` as keyword arguments, of which only
``data_dir`` is used.

File formats: ``<data_dir>/README.md`` (the ``shared/data`` folder beside the checkout).
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onebit.errors import OneBitInputError

Doc = dict[str, Any]


def _file(data_dir: str | Path | None, *parts: str) -> Path:
    if data_dir is None:
        raise OneBitInputError(
            "No data_dir was given for the local zero-shot data (metadata.data_dir)."
        )
    path = Path(data_dir).expanduser().joinpath(*parts)
    if not path.is_file():
        raise OneBitInputError(
            f"Zero-shot data file {path} is missing (set data_dir to shared/data)."
        )
    return path


def _jsonl(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_count(docs: list, labels: list, path: Path) -> None:
    if len(docs) != len(labels):
        raise OneBitInputError(f"{path} has {len(labels)} labels for {len(docs)} items.")


def read_piqa(data_dir: str | Path) -> list[Doc]:
    """PIQA validation: ``goal, sol1, sol2, label`` (label 0/1 from ``dev-labels.lst``)."""
    docs = _jsonl(_file(data_dir, "piqa", "dev.jsonl"))
    path = _file(data_dir, "piqa", "dev-labels.lst")
    labels = _labels(path)
    _check_count(docs, labels, path)
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
        for d, y in zip(docs, labels)
    ]


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag/utils.py preprocess; the file is already cleaned, this catches leftovers.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# ActivityNet contexts end with ctx_b, the lower-case start of the last sentence ("... a roof. he").
_CTX_B = re.compile(r"(?<=[.!?] )[a-z][^.!?]*$")


def read_hellaswag(data_dir: str | Path) -> list[Doc]:
    """HellaSwag validation as lm-eval's ``process_docs`` leaves it: ``query, choices, label``.

    The file stores ``activity_label: ctx`` with ``ctx = ctx_a + " " + ctx_b``; lm-eval capitalizes
    ctx_b, which we recover as a lower-case fragment after the last sentence end (ActivityNet
    items): wrong only where ctx_b is empty and ctx_a ends in such a fragment.
    """
    path = _file(data_dir, "hellaswag", "hellaswag_val_full.txt.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise OneBitInputError(f"{path} has {len(lines)} lines, not 6 per item.")
    docs = []
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i : i + 6]
        ctx = _CTX_B.sub(lambda m: m.group(0).capitalize(), ctx.strip())
        docs.append(
            {
                "query": _hellaswag_preprocess(ctx),
                "choices": [_hellaswag_preprocess(e) for e in endings],
                "label": int(gold),
            }
        )
    return docs


def read_arc(data_dir: str | Path, subset: str = "Easy", split: str = "Test") -> list[Doc]:
    """AI2 ARC as ``allenai/ai2_arc``: ``question, choices{text, label}, answerKey``."""
    path = _file(data_dir, "arc", f"ARC-{subset}-{split}.jsonl")
    docs = []
    for d in _jsonl(path):
        choices = d["question"]["choices"]
        docs.append(
            {
                "id": d["id"],
                "question": d["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in choices],
                    "label": [c["label"] for c in choices],
                },
                "answerKey": d["answerKey"],
            }
        )
    return docs


def read_boolq(data_dir: str | Path) -> list[Doc]:
    """BoolQ validation: ``question, passage, label`` (label 1 = true, the "yes" choice)."""
    path = _file(data_dir, "boolq", "val.jsonl")
    docs = []
    for d in _jsonl(path):
        label = str(d["label"]).lower()  # the SuperGLUE copy stores "true" / "false" strings
        if label not in ("true", "false"):
            raise OneBitInputError(f"{path} has a label that is not true/false: {d['label']!r}.")
        docs.append(
            {"question": d["question"], "passage": d["passage"], "label": int(label == "true")}
        )
    return docs


def read_winogrande(data_dir: str | Path) -> list[Doc]:
    """WinoGrande (xl) validation: ``sentence, option1, option2, answer`` ("1"/"2")."""
    path = _file(data_dir, "winogrande", "dev_reconstructed.jsonl")
    docs = _jsonl(path)
    for d in docs:
        if d["answer"] not in ("1", "2") or d["sentence"].count("_") != 1:
            raise OneBitInputError(f"{path} has an item without one blank and answer 1/2: {d}.")
    return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in docs]


# lm-eval's winogrande "partial evaluation": one context per option (the sentence up to the blank,
# with the option filled in), one shared continuation (the rest); doc_to_text is the gold context.
def winogrande_doc_to_text(doc: Doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: Doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: Doc) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _dataset(split: str, read: Callable[..., list[Doc]], data_dir: Any, **kw: Any) -> Any:
    import datasets  # lazy: heavy

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read(data_dir, **kw))})


def load_piqa(data_dir: str | None = None, **_: Any) -> Any:
    return _dataset("validation", read_piqa, data_dir)


def load_hellaswag(data_dir: str | None = None, **_: Any) -> Any:
    return _dataset("validation", read_hellaswag, data_dir)


def load_arc_easy(data_dir: str | None = None, **_: Any) -> Any:
    return _dataset("test", read_arc, data_dir, subset="Easy")


def load_arc_challenge(data_dir: str | None = None, **_: Any) -> Any:
    return _dataset("test", read_arc, data_dir, subset="Challenge")


def load_boolq(data_dir: str | None = None, **_: Any) -> Any:
    return _dataset("validation", read_boolq, data_dir)


def load_winogrande(data_dir: str | None = None, **_: Any) -> Any:
    return _dataset("validation", read_winogrande, data_dir)


FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "piqa": (("piqa", "dev.jsonl"), ("piqa", "dev-labels.lst")),
    "hellaswag": (("hellaswag", "hellaswag_val_full.txt.bz2"),),
    "arc_easy": (("arc", "ARC-Easy-Test.jsonl"),),
    "arc_challenge": (("arc", "ARC-Challenge-Test.jsonl"),),
    "boolq": (("boolq", "val.jsonl"),),
    "winogrande": (("winogrande", "dev_reconstructed.jsonl"),),
}


def check_files(task: str, data_dir: str | Path) -> None:
    """Raises :class:`OneBitInputError` naming the first missing file of ``task``."""
    for parts in FILES[task]:
        _file(data_dir, *parts)


READERS: dict[str, Callable[[str | Path], list[Doc]]] = {
    "piqa": read_piqa,
    "hellaswag": read_hellaswag,
    "arc_easy": lambda d: read_arc(d, "Easy"),
    "arc_challenge": lambda d: read_arc(d, "Challenge"),
    "boolq": read_boolq,
    "winogrande": read_winogrande,
}
