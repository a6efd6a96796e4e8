"""Numerical guards: a NaN injected into a layer, its output or a gradient is caught at the step it
happens; ``stop`` names the step, the loss terms and the layer, ``skip`` drops and counts the step.
KD on fp16 logits is computed in fp32 and does not overflow where the official fp16 one does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from onebit.distill import DistillLoss, DistillLossConfig
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, freeze_, quantize_
from onebit.train.guards import GuardConfig, locate_nonfinite

from .conftest import FAULTS, assert_one_sentence, cli, tiny

STEPS = ["trainer.max_steps=6", "callbacks.resume.every_n_train_steps=2", "export=false"]


def _inject(where: str, target: str, at_step: int = 3) -> list[str]:
    return [
        f"+callbacks.nan._target_={FAULTS}.InjectNaN",
        f"+callbacks.nan.at_step={at_step}",
        f"+callbacks.nan.target={target}",
        f"+callbacks.nan.where={where}",
    ]


def _record(tmp_path: Path, at_step: int = 3) -> list[str]:
    return [
        f"+callbacks.rec._target_={FAULTS}.RecordStep",
        f"+callbacks.rec.at_step={at_step}",
        f"+callbacks.rec.path={tmp_path / 'step.pt'}",
    ]


def test_nan_in_a_layer_stops_at_that_step_naming_terms_and_layer(tmp_path: Path) -> None:
    layer = "model.layers.1.mlp.down_proj"
    cfg = tiny(tmp_path, *STEPS, *_inject("param", f"{layer}.in_scale"))
    code, line, _ = cli(cfg)
    assert code == 3, line
    assert_one_sentence(line)
    assert line.startswith("error: non-finite loss at training step 3 (global_step=2): loss=nan, ")
    assert "kd=nan" in line and "hidden=nan" in line
    assert f"parameter {layer}.in_scale of the student holds NaN/inf" in line
    assert line.endswith("guard.nonfinite=skip would skip such steps instead.")
    out = Path(cfg.paths.output_dir)
    assert not (out / "result.json").exists() and not (out / "onebit_model").exists()
    good = torch.load(out / "checkpoints" / "step00000002.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())  # nothing NaN saved


def test_nan_gradient_stops_naming_the_parameter(tmp_path: Path) -> None:
    param = "model.layers.0.mlp.up_proj.weight"
    code, line, _ = cli(tiny(tmp_path, *STEPS, *_inject("grad", param)))
    assert code == 3, line
    assert_one_sentence(line)
    assert line.startswith(
        f"error: non-finite gradient at training step 3 (global_step=2) in parameter {param} "
        "of the student (the loss was finite)"
    )


@pytest.mark.parametrize(
    ("where", "target"),
    [("output", "model.layers.1.self_attn.o_proj"), ("grad", "model.layers.0.mlp.up_proj.weight")],
)
def test_skip_drops_the_step_counts_it_and_trains_on(
    tmp_path: Path, where: str, target: str
) -> None:
    cfg = tiny(
        tmp_path,
        *[s for s in STEPS if not s.startswith("logger")],
        "logger=csv",
        "guard.nonfinite=skip",
        *_inject(where, target),
        *_record(tmp_path),
    )
    with pytest.warns(UserWarning, match="skipped: non-finite .* at training step 3"):
        code, line, _ = cli(cfg)
    assert code == 0, line
    step = torch.load(tmp_path / "step.pt", weights_only=True)
    before, after = step["before"], step["after"]
    assert after["global_step"] == 3  # the step counts toward max_steps and the schedule
    assert after["adam_steps"] == before["adam_steps"]  # but updated no optimizer state
    for name, value in before["params"].items():
        torch.testing.assert_close(after["params"][name], value, atol=0, rtol=0, msg=name)
    out = Path(cfg.paths.output_dir)
    result = json.loads((out / "result.json").read_text())
    assert result["nonfinite_skipped"] == 1 and result["global_step"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for v in result["metrics"].values())
    with open(next(out.rglob("metrics.csv"))) as f:
        counts = [
            float(r["train/nonfinite_skipped"])
            for r in csv.DictReader(f)
            if r.get("train/nonfinite_skipped")
        ]
    assert counts == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # logged every step, from the step it happened
    ckpt = torch.load(out / "checkpoints" / "step00000006.ckpt", weights_only=True)
    assert ckpt["onebit"]["nonfinite_skipped"] == 1  # and carried over a resume


def test_skip_stops_after_too_many_in_a_row(tmp_path: Path) -> None:
    cfg = tiny(
        tmp_path,
        *STEPS,
        "guard.nonfinite=skip",
        "guard.max_consecutive_skips=2",
        *_inject("output_always", "model.layers.0.self_attn.q_proj", at_step=2),
    )
    with pytest.warns(UserWarning, match="skipped"):
        code, line, _ = cli(cfg)
    assert code == 3, line
    assert_one_sentence(line)
    assert line.startswith("error: non-finite loss at training step 4 (global_step=3)")
    assert line.endswith(
        "that is 3 skipped steps in a row, more than guard.max_consecutive_skips=2."
    )


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_latent_weight_hidden_by_sign_still_stops(tmp_path: Path, policy: str) -> None:
    # sign(NaN) is a sign, so a NaN latent weight leaves the loss finite: the weights are checked
    param = "model.layers.0.self_attn.q_proj.weight"
    cfg = tiny(tmp_path, *STEPS, f"guard.nonfinite={policy}", *_inject("param", param))
    code, line, _ = cli(cfg)
    assert code == 3, line
    assert_one_sentence(line)
    assert line.startswith(
        f"error: non-finite parameter at training step 3 (global_step=2): {param} of the "
        "student holds NaN/inf while the loss and gradients are finite"
    )


def test_locate_names_the_first_layer_whose_output_is_nan() -> None:
    student = freeze_(quantize_(tiny_causal_lm("llama"), OneBitConfig()))
    layer = "model.layers.1.mlp.down_proj"
    student.get_submodule(layer).register_forward_hook(lambda m, a, out: out * float("nan"))
    ids = torch.randint(0, 128, (2, 8))
    where = locate_nonfinite(student, None, lambda m: m(input_ids=ids))
    assert where == f"the output of student layer {layer} is the first NaN/inf"


def test_guard_config_is_checked() -> None:
    from onebit.errors import OneBitInputError

    with pytest.raises(
        OneBitInputError, match=r"guard\.nonfinite='ignore' is not one of stop, skip"
    ):
        GuardConfig(nonfinite="ignore")
    with pytest.raises(OneBitInputError, match=r"guard\.max_consecutive_skips=0"):
        GuardConfig(max_consecutive_skips=0)


def test_kd_on_fp16_logits_is_fp32_and_does_not_overflow() -> None:
    """The official run logged ``kd_loss: inf``: fp16 KL summed over every token overflows 65504.
    Our KD (``onebit/distill/losses.py``) takes fp16 logits and computes in fp32."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 512, 128, generator=g) * 30).half()
    t = (torch.randn(2, 512, 128, generator=g) * 30).half()
    official_fp16 = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    assert official_fp16.dtype == torch.float16 and torch.isinf(official_fp16)

    terms = DistillLoss(DistillLossConfig.official(hidden_weight=0.0))(s, t)
    s64, t64 = s.double(), t.double()
    kl = (F.softmax(t64, -1) * (F.log_softmax(t64, -1) - F.log_softmax(s64, -1))).sum(-1)
    assert terms["kd"].dtype == torch.float32 and terms["loss"].dtype == torch.float32
    assert kl.sum() > 65504  # the sum over tokens, before ÷ batch, is beyond fp16's range
    torch.testing.assert_close(terms["kd"].double(), kl.sum() / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["loss"].double(), 0.01 * kl.sum() / 2, rtol=1e-6, atol=0)
