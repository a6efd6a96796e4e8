"""Zero-shot eval: the loaders read every item, acc is argmax == gold, a real tiny model runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from onebit.errors import OneBitInputError
from onebit.eval.tasks.local_data import READERS, read_piqa, read_winogrande
from onebit.eval.zeroshot import PAPER_METRIC, TASKS, evaluate_lm, zero_shot
from tests.conftest import shared_path

# Item counts of the published validation / test splits (shared/data/README.md).
COUNTS = {
    "piqa": 1838,
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "winogrande": 1267,
}


@pytest.fixture
def data_dir() -> Path:
    return shared_path("data")


def _gold_and_n_choices(task: str, doc: dict) -> tuple[int, int]:
    if task == "piqa":
        return doc["label"], 2
    if task == "hellaswag":
        return doc["label"], len(doc["choices"])
    if task.startswith("arc"):
        return doc["choices"]["label"].index(doc["answerKey"]), len(doc["choices"]["label"])
    if task == "boolq":
        return doc["label"], 2
    return int(doc["answer"]) - 1, 2


@pytest.mark.parametrize("task", TASKS)
def test_loader_reads_every_item_with_gold_in_range(task: str, data_dir: Path) -> None:
    docs = READERS[task](data_dir)
    assert len(docs) == COUNTS[task]
    golds = [_gold_and_n_choices(task, doc) for doc in docs]
    assert all(0 <= gold < n_choices for gold, n_choices in golds)
    counts = Counter(gold for gold, _ in golds)
    assert max(counts.values()) < 0.7 * len(docs)  # no label column parsed as a constant


def test_boolq_label_counts(data_dir: Path) -> None:
    labels = Counter(doc["label"] for doc in READERS["boolq"](data_dir))
    assert labels == {1: 2033, 0: 1237}  # "true" / "false" strings in the file


def test_winogrande_answers_equal_label_file(data_dir: Path) -> None:
    labels = (data_dir / "winogrande" / "dev-labels.lst").read_text().split()
    assert [d["answer"] for d in read_winogrande(data_dir)] == labels


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(OneBitInputError, match=r"piqa/dev\.jsonl"):
        evaluate_lm(lm=None, tasks=["piqa"], data_dir=tmp_path)
    with pytest.raises(OneBitInputError, match="Unknown zero-shot task"):
        evaluate_lm(lm=None, tasks=["mmlu"], data_dir=tmp_path)


def test_paper_metric_covers_every_task() -> None:
    assert set(PAPER_METRIC) == set(TASKS)
    assert set(PAPER_METRIC.values()) <= {"acc", "acc_norm"}


def test_acc_is_fraction_of_argmax_equal_gold(data_dir: Path) -> None:
    """A fake LM scores each choice by minus the length of its continuation (" " + choice): acc
    picks the shortest choice, acc_norm the argmax of ll / len(choice) = -(1 + 1/len), the longest.
    """
    from lm_eval.api.model import LM

    class ShortestChoiceLM(LM):
        def loglikelihood(self, requests):
            return [(-float(len(r.args[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    def argmax(xs: list[float]) -> int:
        return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first one on a tie, like numpy

    limit = 200
    docs = read_piqa(data_dir)[:limit]
    lens = [[len(d["sol1"]), len(d["sol2"])] for d in docs]
    pred = [argmax([-(n + 1.0) for n in ns]) for ns in lens]
    pred_norm = [argmax([-(n + 1.0) / n for n in ns]) for ns in lens]
    acc = sum(p == d["label"] for p, d in zip(pred, docs)) / limit
    acc_norm = sum(p == d["label"] for p, d in zip(pred_norm, docs)) / limit

    scores = evaluate_lm(ShortestChoiceLM(), tasks=["piqa"], data_dir=data_dir, limit=limit)
    assert scores["piqa"]["n"] == limit
    assert scores["piqa"]["acc"] == pytest.approx(acc, abs=1e-12)
    assert scores["piqa"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert 0.1 < acc < 0.9 and acc != acc_norm  # the check can tell the two apart


def test_tiny_real_model_on_all_tasks(stories_path: Path, data_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    scores = zero_shot(model, tokenizer, data_dir=data_dir, limit=5, batch_size=8)

    assert set(scores) == set(TASKS)
    for task, s in scores.items():
        assert s["n"] == 5
        assert 0.0 <= s["acc"] <= 1.0
        if task in ("boolq", "winogrande"):  # lm-eval defines only acc for these
            assert s["acc_norm"] is None
        else:
            assert 0.0 <= s["acc_norm"] <= 1.0


def test_hub_mode_offline_is_one_clear_sentence(monkeypatch) -> None:
    import onebit.hub

    monkeypatch.setattr(onebit.hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(OneBitInputError, match="zero_shot_data_dir="):
        evaluate_lm(object(), tasks=["piqa"], data_dir=None)
