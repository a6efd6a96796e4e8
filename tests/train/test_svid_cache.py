"""SVID is computed once per model and setting and read back by later runs (and other ranks)."""

from __future__ import annotations

import pytest
import torch

from onebit.models import tiny_causal_lm
from onebit.quant import OneBitLinear
from onebit.quant.svid_cache import SvidCache
from onebit.train.module import OneBitDistillation


def _student_scales(module: OneBitDistillation) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{k}": getattr(m, k).detach().clone()
        for n, m in module.student.named_modules()
        if isinstance(m, OneBitLinear)
        for k in ("in_scale", "out_scale")
    }


def test_second_run_reads_svid_from_the_cache(tmp_path, monkeypatch) -> None:
    spec = {"name": "tiny_llama", "source": "tiny", "arch": "llama"}
    teacher = tiny_causal_lm("llama")
    first = OneBitDistillation(spec, teacher=teacher, svid_cache_dir=str(tmp_path))
    first.configure_model()
    files = list(tmp_path.glob("tiny_llama-nmf-*.safetensors"))
    assert len(files) == 1 and first.svid_cache_hits == 0
    assert len(SvidCache(files[0])) == 14  # 2 blocks × 7 linears

    def no_svid(*args, **kwargs):
        raise AssertionError("SVID recomputed despite the cache")

    monkeypatch.setattr("onebit.quant.convert.svid", no_svid)
    second = OneBitDistillation(spec, teacher=teacher, svid_cache_dir=str(tmp_path))
    second.configure_model()
    assert second.svid_cache_hits == 14
    a, b = _student_scales(first), _student_scales(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_svid_setting_gets_its_own_file(tmp_path) -> None:
    spec = {"name": "tiny_llama", "source": "tiny", "arch": "llama"}
    teacher = tiny_causal_lm("llama")
    for method in ("nmf", "svd"):
        m = OneBitDistillation(
            spec, quant={"svid_method": method}, teacher=teacher, svid_cache_dir=str(tmp_path)
        )
        m.configure_model()
        assert m.svid_cache_hits == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_cache_from_another_svid_version_is_not_read(tmp_path, monkeypatch) -> None:
    """A change of the iterative methods' arithmetic or stopping rule (SVID_VERSION) makes a new
    file rather than reading the old version's results."""
    spec = {"name": "tiny_llama", "source": "tiny", "arch": "llama"}
    teacher = tiny_causal_lm("llama")
    OneBitDistillation(spec, teacher=teacher, svid_cache_dir=str(tmp_path)).configure_model()
    monkeypatch.setattr("onebit.quant.svid_cache.SVID_VERSION", 1)
    old = OneBitDistillation(spec, teacher=teacher, svid_cache_dir=str(tmp_path))
    old.configure_model()
    assert old.svid_cache_hits == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_corrupt_cache_is_recomputed_and_rewritten(tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"not a safetensors file")
    cache = SvidCache(path)
    assert len(cache) == 0
    cache.put("x", torch.ones(3), torch.ones(2))
    cache.save()
    assert SvidCache(path).get("x", 3, 2) is not None
    assert SvidCache(path).get("x", 4, 2) is None  # another shape: not this layer's


@pytest.mark.parametrize("method", ["none"])
def test_no_cache_for_the_plain_copy(tmp_path, method) -> None:
    m = OneBitDistillation(
        {"name": "tiny_llama", "source": "tiny", "arch": "llama"},
        quant={"svid_method": method},
        teacher=tiny_causal_lm("llama"),
        svid_cache_dir=str(tmp_path),
    )
    m.configure_model()
    assert not list(tmp_path.iterdir())
