"""Output gains: calibration from the teacher, packing, export and footprint of a gained student."""

from __future__ import annotations

import copy

import pytest
import torch

from onebit.diagnostics import layer_output_scales
from onebit.models import tiny_causal_lm
from onebit.quant import (
    OneBitConfig,
    OneBitLinear,
    PackedOneBitLinear,
    calibrate_output_gains_,
    footprint,
    freeze_,
    pack_,
    quantize_,
)

GAIN = OneBitConfig(output_gain=True)


def _channel_ms(model, ids, names):
    """Per-channel mean square of each named layer's output (bias removed) on ids."""
    out = {}
    hooks = []
    mods = dict(model.named_modules())
    for n in names:

        def hook(m, _i, y, n=n):
            b = 0 if m.bias is None else m.bias
            out[n] = (y - b).reshape(-1, y.shape[-1]).pow(2).mean(0)

        hooks.append(mods[n].register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_rms_calibration_gives_every_channel_its_teachers_scale(arch) -> None:
    teacher = tiny_causal_lm(arch).eval()
    student = freeze_(quantize_(copy.deepcopy(teacher), GAIN)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    gains = calibrate_output_gains_(teacher, student, ids, "rms")
    names = [n for n, m in student.named_modules() if isinstance(m, OneBitLinear)]
    assert sorted(gains) == sorted(names)
    t, s = _channel_ms(teacher, ids, names), _channel_ms(student, ids, names)
    for n in names:  # each on its own inputs: the calibration is sequential
        torch.testing.assert_close(s[n], t[n], rtol=1e-4, atol=1e-10)
    before = freeze_(quantize_(copy.deepcopy(teacher), GAIN)).eval()
    ratio = lambda m: [v.rms_median for v in layer_output_scales(m, ids, names)[0].values()]
    t_rms = ratio(teacher)
    assert max(abs(a / b - 1) for a, b in zip(ratio(student), t_rms)) < 0.5
    assert max(abs(a / b - 1) for a, b in zip(ratio(before), t_rms)) > 10  # LN alone: RMS 1


def test_ls_calibration_solves_each_channels_least_squares() -> None:
    teacher = tiny_causal_lm("llama").eval()
    student = freeze_(quantize_(copy.deepcopy(teacher), GAIN)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    calibrate_output_gains_(teacher, student, ids, "ls")
    layer = student.model.layers[1].mlp.down_proj
    cap = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, i, y, k=k: cap.__setitem__(k, y.reshape(-1, y.shape[-1]))
        )
        for k, m in (("t", teacher.model.layers[1].mlp.down_proj), ("s", layer))
    ]
    with torch.no_grad():
        teacher(input_ids=ids)
        student(input_ids=ids)
    for h in hooks:
        h.remove()
    y_hat = cap["s"] / layer.out_gain  # the output before the gain
    resid = cap["t"] - cap["s"]
    normal = (resid * y_hat).sum(0) / (cap["t"] * y_hat).sum(0).abs().clamp_min(1e-12)
    assert normal.abs().max() < 1e-4  # the residual is orthogonal to ŷ in every channel


def test_calibration_needs_gains() -> None:
    teacher = tiny_causal_lm("llama").eval()
    student = quantize_(copy.deepcopy(teacher), OneBitConfig())
    with pytest.raises(ValueError, match="no output gains"):
        calibrate_output_gains_(teacher, student, torch.zeros(1, 4, dtype=torch.long))


def test_packed_gained_student_equals_the_trained_one() -> None:
    teacher = tiny_causal_lm("llama").eval()
    student = freeze_(quantize_(copy.deepcopy(teacher), GAIN)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    calibrate_output_gains_(teacher, student, ids)
    with torch.no_grad():
        ref = student(input_ids=ids).logits
        packed = pack_(copy.deepcopy(student))
        assert all(
            m.out_gain is not None for m in packed.modules() if isinstance(m, PackedOneBitLinear)
        )
        torch.testing.assert_close(packed(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_export_round_trip_keeps_the_gains(tmp_path) -> None:
    from onebit.export import load_onebit, save_onebit

    teacher = tiny_causal_lm("opt").eval()
    student = freeze_(quantize_(copy.deepcopy(teacher), GAIN)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    calibrate_output_gains_(teacher, student, ids)
    save_onebit(student, tmp_path / "ex", GAIN, dtype=torch.float32)
    loaded = load_onebit(tmp_path / "ex")
    name = "model.decoder.layers.0.fc2"
    torch.testing.assert_close(
        loaded.get_submodule(name).out_gain, student.get_submodule(name).out_gain, atol=0, rtol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, student(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_footprint_counts_gains_and_kept_layers() -> None:
    teacher = tiny_causal_lm("llama")
    plain = footprint(quantize_(copy.deepcopy(teacher), OneBitConfig()))
    gained = footprint(quantize_(copy.deepcopy(teacher), GAIN))
    outs = (
        sum(m.out_features for m in teacher.modules() if isinstance(m, torch.nn.Linear))
        - teacher.lm_head.out_features
    )
    assert gained.value_params - plain.value_params == outs
    assert footprint(teacher, GAIN).value_params == gained.value_params  # before quantizing too
    keep = "model.layers.1.mlp.down_proj"
    q = OneBitConfig(skip_modules=(keep,))
    kept = footprint(quantize_(copy.deepcopy(teacher), q), q)
    w = teacher.get_submodule(keep).weight
    assert (kept.kept_layers, kept.kept_params) == (1, w.numel())
    assert kept.quantized_weights == plain.quantized_weights - w.numel()
    assert kept.other_params == plain.other_params + w.numel()
    assert "of which kept linears" in kept.format()


def test_massive_layer_names_ranks_the_layers_beyond_the_layers_range() -> None:
    """A layer is "massive" when max |y| > sqrt(out - 1) on the text; the k furthest above come
    first, and layers within the range are never named."""
    from onebit.quant import massive_layer_names

    teacher = tiny_causal_lm("llama")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # in the last block, so that no later layer sees it
        teacher.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(1e4)
        teacher.get_submodule("model.layers.1.mlp.up_proj").weight.mul_(1e3)
    ratios = {}
    for name, m in teacher.named_modules():
        if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear):
            m.register_forward_hook(
                lambda _m, _i, y, name=name: ratios.__setitem__(
                    name, float(y.abs().max()) / (y.shape[-1] - 1) ** 0.5
                )
            )
    with torch.no_grad():
        teacher(input_ids=ids)
    for m in teacher.modules():
        m._forward_hooks.clear()
    over = sorted((r, n) for n, r in ratios.items() if r > 1)[::-1]
    assert over[0][1] == "model.layers.1.mlp.down_proj" and len(over) >= 2
    assert massive_layer_names(teacher, ids, 2) == [n for _, n in over[:2]]
    assert massive_layer_names(teacher, ids, 100) == [n for _, n in over]  # only those over 1
    assert len(over) < len(ratios)


def test_quantize_refuses_an_unresolved_keep_massive() -> None:
    from onebit.errors import OneBitInputError

    with pytest.raises(OneBitInputError, match=r"quant.keep_massive=2 chooses layers"):
        quantize_(tiny_causal_lm("llama"), OneBitConfig(keep_massive=2))
    with pytest.raises(OneBitInputError, match=r"quant.keep_massive=-1 must be an integer >= 0"):
        OneBitConfig(keep_massive=-1)
    q = OneBitConfig(keep_massive=2).with_kept(["a.b"])
    assert (q.keep_massive, q.skip_modules, q.needs_calibration) == (0, ("a.b",), False)
