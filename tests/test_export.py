"""Export → load: the packed 1-bit model reloads without dense weights and gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from onebit import kernels
from onebit.errors import OneBitInputError
from onebit.export import load_onebit, save_onebit
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, PackedOneBitLinear, footprint, freeze_, quantize_


def _trained_student(arch: str):
    student = freeze_(quantize_(tiny_causal_lm(arch), OneBitConfig()))
    with torch.no_grad():  # as after training: latent weights and scales moved
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return student.eval()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_export_load_gives_the_students_logits(arch: str, tmp_path) -> None:
    student = _trained_student(arch)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = student(ids).logits
    path = save_onebit(student, tmp_path / "export", OneBitConfig(), dtype=torch.float32)
    loaded = load_onebit(path)
    n_packed = sum(isinstance(m, PackedOneBitLinear) for m in loaded.modules())
    assert n_packed == footprint(student).quantized_layers
    with torch.no_grad(), kernels.disabled():  # reference path: bitwise
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
    if kernels.available():  # the C++ kernel: decode (1 token) and prefill, fp32 rounding
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=1e-4)
            one = loaded(ids[:1, :1]).logits
        torch.testing.assert_close(one, expected[:1, :1], atol=1e-4, rtol=1e-4)
    info = json.loads((path / "config.json").read_text())["onebit"]
    assert info["bit_order"] == "little" and info["quant"]["sign_of_zero"] == "plus"


def test_tied_embeddings_are_stored_once_and_retied(stories_path, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    student = freeze_(quantize_(AutoModelForCausalLM.from_pretrained(stories_path), OneBitConfig()))
    path = save_onebit(student, tmp_path / "e", OneBitConfig(), dtype=torch.float32)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = load_onebit(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad(), kernels.disabled():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, atol=0, rtol=0)


def test_export_file_size_matches_the_footprint(tmp_path) -> None:
    student = _trained_student("llama")
    path = save_onebit(student, tmp_path / "e", OneBitConfig(), dtype=torch.float16)
    report = footprint(student)
    size = (path / "model.safetensors").stat().st_size
    # safetensors adds a JSON header; everything else is the footprint's bytes at rest
    assert report.onebit_bytes <= size <= report.onebit_bytes + 16_384
    loaded = load_onebit(path)
    tensors = {  # by storage, so tied tensors count once; rotary tables are computed, not stored
        t.data_ptr(): t
        for name, t in [*loaded.named_parameters(), *loaded.named_buffers()]
        if "rotary_emb" not in name
    }
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == report.onebit_bytes


def test_a_failed_export_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    student = _trained_student("llama")
    path = save_onebit(student, tmp_path / "e", OneBitConfig(), dtype=torch.float32)
    before = (path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        save_onebit(_trained_student("llama"), path, OneBitConfig())
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary directory left behind


def test_load_rejects_what_is_not_an_export(tmp_path) -> None:
    with pytest.raises(OneBitInputError, match="is not a OneBit export"):
        load_onebit(tmp_path)
