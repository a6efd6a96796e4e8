"""Block-wise reconstruction (Block-AP): errors go down, resumption is exact, inputs are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from onebit.distill.blockwise import BlockwiseConfig, _Interrupted, blockwise_reconstruct_
from onebit.errors import OneBitInputError
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, OneBitLinear, freeze_, quantize_

CFG = BlockwiseConfig(steps=15, batch_size=2)


def _pair(arch: str = "llama", **overrides):
    teacher = tiny_causal_lm(arch, **overrides).eval()
    return teacher, freeze_(quantize_(copy.deepcopy(teacher), OneBitConfig()))


def _ids(model, n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seq))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_every_block_error_goes_down_and_the_student_still_runs(arch) -> None:
    teacher, student = _pair(arch)
    ids = _ids(teacher)
    out = blockwise_reconstruct_(teacher, student, ids, CFG, progress=False)
    assert [b["block"] for b in out["blocks"]] == [0, 1]
    for b in out["blocks"]:
        assert b["rel_err_after"] < b["rel_err_before"]
        assert b["loss_after"] < b["loss_before"]
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert logits.shape == (*ids.shape, teacher.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_blockwise_lowers_every_block_error_on_stories260k(stories_path) -> None:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(stories_path).float().eval()
    student = freeze_(quantize_(copy.deepcopy(teacher), OneBitConfig()))
    ids = _ids(teacher, 8, 32)
    out = blockwise_reconstruct_(
        teacher, student, ids, BlockwiseConfig(steps=25, batch_size=4), progress=False
    )
    assert len(out["blocks"]) == teacher.config.num_hidden_layers
    for b in out["blocks"]:
        assert b["rel_err_after"] < b["rel_err_before"], b


def test_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    teacher, student = _pair("opt", num_hidden_layers=3)  # OPT: dropout in train mode
    interrupted, fresh = copy.deepcopy(student), copy.deepcopy(student)
    ids = _ids(teacher)
    full = blockwise_reconstruct_(teacher, student, ids, CFG, progress=False, seed=3)
    path = tmp_path / "blockwise.pt"
    with pytest.raises(_Interrupted):
        blockwise_reconstruct_(
            teacher, interrupted, ids, CFG, state_path=path, progress=False, seed=3, _stop_after=1
        )
    # a new process: blocks 0 and 1 come from the state file, block 2 is trained
    out = blockwise_reconstruct_(teacher, fresh, ids, CFG, state_path=path, progress=False, seed=3)
    assert out["blocks"] == full["blocks"]
    a, b = student.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert path.exists()  # left for the caller


@pytest.mark.parametrize("change", ["ids", "config"])
def test_a_state_from_another_run_is_refused(tmp_path, change) -> None:
    teacher, student = _pair()
    ids = _ids(teacher)
    path = tmp_path / "state.pt"
    with pytest.raises(_Interrupted):
        blockwise_reconstruct_(
            teacher, student, ids, CFG, state_path=path, progress=False, _stop_after=0
        )
    other_ids, cfg = (ids.flip(0), CFG) if change == "ids" else (ids, BlockwiseConfig(steps=3))
    with pytest.raises(OneBitInputError, match=str(path)):
        blockwise_reconstruct_(teacher, student, other_ids, cfg, state_path=path, progress=False)


@pytest.mark.parametrize(
    ("key", "value"), [("steps", -1), ("loss", "l1"), ("batch_size", 0), ("lr", float("nan"))]
)
def test_bad_config_values_name_the_key(key, value) -> None:
    with pytest.raises(OneBitInputError, match=f"blockwise.{key}"):
        BlockwiseConfig(**{key: value})
    with pytest.raises(OneBitInputError, match="blockwise has unknown key"):
        BlockwiseConfig.from_dict({"step": 3})


def test_only_the_current_blocks_onebit_parameters_change() -> None:
    teacher, student = _pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    onebit = {
        f"{n}.{k}"
        for n, m in student.named_modules()
        if isinstance(m, OneBitLinear)
        for k, _ in m.named_parameters()
    }
    ids = _ids(teacher)
    rng = torch.get_rng_state()
    student.train()
    with pytest.raises(_Interrupted):  # block 0 trained, block 1 not yet
        blockwise_reconstruct_(teacher, student, ids, CFG, progress=False, _stop_after=0)
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= {k for k in onebit if k.startswith("model.layers.0.")}
    blockwise_reconstruct_(teacher, student, ids, CFG, progress=False)
    after = student.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} <= onebit
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert all(p.grad is None for p in student.parameters())
    assert student.training and all(m.training for m in student.modules())
    assert not teacher.training
    assert torch.equal(torch.get_rng_state(), rng)  # seeded generators, not the global RNG


def test_zero_steps_is_off() -> None:
    teacher, student = _pair()
    before = copy.deepcopy(student.state_dict())
    out = blockwise_reconstruct_(teacher, student, _ids(teacher), BlockwiseConfig())
    assert out["blocks"] == []
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
