"""onebit.loading: one loader for a Hugging Face model, an export and a train.py checkpoint."""

from __future__ import annotations

import pytest
import torch

import onebit.models
from onebit.errors import OneBitInputError
from onebit.loading import load_model

from .train.conftest import TINY, compose_train

TINY_SPEC = {"name": "tiny_llama", "source": "tiny", "arch": "llama"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A few steps of train.py on the tiny model: its checkpoint and its export."""
    import train

    tmp = tmp_path_factory.mktemp("run")
    result = train.run(compose_train([*TINY, "trainer.max_steps=3", "export_dtype=float32"], tmp))
    return result


def test_a_checkpoint_loads_its_student_without_the_teacher(tiny_run, monkeypatch) -> None:
    """The student of a checkpoint gives the export's logits; no full-precision model is loaded."""
    calls = []
    monkeypatch.setattr(onebit.models, "load_causal_lm", lambda *a, **k: calls.append(a))
    from_ckpt = load_model("checkpoint", path=tiny_run["checkpoint_last"])
    from_export = load_model("export", path=tiny_run["export"])
    assert calls == []
    assert from_ckpt.name == "tiny_llama (OneBit ckpt)" and from_ckpt.spec.name == "tiny_llama"
    assert from_export.name == "tiny_llama (OneBit)"
    assert from_ckpt.model.config.onebit["model"]["name"] == "tiny_llama"
    vocab = from_ckpt.model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = from_ckpt.model(ids).logits, from_export.model(ids).logits
    assert not from_ckpt.model.training
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_hf_source_is_the_full_precision_model() -> None:
    loaded = load_model("hf", model=TINY_SPEC, dtype=torch.float64)
    assert loaded.name == "tiny_llama (full precision)" and loaded.tokenizer is None
    assert next(loaded.model.parameters()).dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "gguf", "path": "x"}, r"source=gguf is not one of hf, export, checkpoint"),
        ({"source": "export", "path": "/nope/x"}, r"path=/nope/x does not exist"),
        ({"source": "checkpoint", "path": None}, r"path=None does not exist"),
        ({"source": "hf"}, r"source=hf needs a model"),
    ],
)
def test_bad_sources_and_paths_are_one_sentence(kwargs, match) -> None:
    with pytest.raises(OneBitInputError, match=match):
        load_model(**kwargs)


def test_a_file_that_is_not_a_train_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(OneBitInputError, match=r"is not a checkpoint written by train\.py"):
        load_model("checkpoint", path=path)
