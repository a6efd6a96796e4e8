"""quantize_ swaps exactly the decoder-block linears of each architecture; freeze_ leaves only them
trainable.
"""

from __future__ import annotations

import pytest
import torch

from onebit.models import TINY_ARCHS, tiny_causal_lm
from onebit.quant import (
    OneBitConfig,
    OneBitLinear,
    find_decoder_blocks,
    freeze_,
    quantize_,
)

EXPECTED = {
    "llama": (
        "model.layers",
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ],
    ),
    "opt": (
        "model.decoder.layers",
        [
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.q_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ],
    ),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["qwen3"] = EXPECTED["llama"]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_quantize_swaps_exactly_the_block_linears(arch: str) -> None:
    model = tiny_causal_lm(arch)
    prefix, subs = EXPECTED[arch]
    assert find_decoder_blocks(model)[0] == prefix
    quantize_(model, OneBitConfig())
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, OneBitLinear))
    assert swapped == sorted(f"{prefix}.{i}.{s}" for i in range(2) for s in subs)
    # lm_head and embeddings untouched
    assert type(model.get_output_embeddings()).__name__ == "Linear"
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_quantized_model_runs_forward_and_backward(arch: str) -> None:
    model = freeze_(quantize_(tiny_causal_lm(arch), OneBitConfig())).train()
    ids = torch.randint(0, 128, (2, 12))
    out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (2, 12, 128) and torch.isfinite(out.logits).all()
    (out.logits.float() @ torch.randn(128)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".weight" in n or "scale" in n or "bias" in n for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_freeze_leaves_only_onebit_parameters_trainable(arch: str) -> None:
    model = freeze_(quantize_(tiny_causal_lm(arch), OneBitConfig()))
    onebit_params = {
        id(p) for m in model.modules() if isinstance(m, OneBitLinear) for p in m.parameters()
    }
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in onebit_params), name


def test_gpt2_conv1d_is_transposed() -> None:
    model = tiny_causal_lm("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in=32, out=128)
    x = torch.randn(3, 32)
    cfg = OneBitConfig(svid_method="none", latent_init="weight", output_norm=False)
    quantize_(model, cfg)
    layer = model.transformer.h[0].mlp.c_fc
    assert (layer.in_features, layer.out_features) == (32, 128)
    expected = x @ torch.where(conv.weight >= 0, 1.0, -1.0) + conv.bias
    torch.testing.assert_close(layer(x), expected.detach(), atol=1e-5, rtol=1e-5)


def test_filter_fn_and_skip_modules_select_layers() -> None:
    model = quantize_(
        tiny_causal_lm("llama"),
        OneBitConfig(skip_modules=("*.mlp.down_proj",)),
        filter_fn=lambda m, name: not name.startswith("model.layers.1."),
    )
    swapped = {n for n, m in model.named_modules() if isinstance(m, OneBitLinear)}
    assert len(swapped) == 6
    assert all(n.startswith("model.layers.0.") and "down_proj" not in n for n in swapped)


def test_quantize_is_idempotent() -> None:
    model = quantize_(tiny_causal_lm("llama"), OneBitConfig())
    layers = [m for m in model.modules() if isinstance(m, OneBitLinear)]
    quantize_(model, OneBitConfig())
    assert [m for m in model.modules() if isinstance(m, OneBitLinear)] == layers


def test_meta_device_swap_has_shapes_only() -> None:
    from transformers import AutoModelForCausalLM

    from onebit.models import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    quantize_(model, OneBitConfig())
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, OneBitLinear) and layer.weight.is_meta
    assert layer.weight.shape == (32, 64)
