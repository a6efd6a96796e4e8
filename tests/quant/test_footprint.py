"""Footprint: the paper's LLaMA-7B figures from the real architecture on the meta device."""

from __future__ import annotations

import pytest
import torch

from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, footprint, layer_bits_per_weight, pack_, quantize_


@pytest.fixture(scope="module")
def llama7b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_one_4096_layer_matches_the_paper() -> None:
    w = 4096 * 4096
    bits = w + 16 * (4096 + 4096)
    assert round(bits / (w + 2 * 4096), 4) == 1.0073  # the paper's count
    assert round(layer_bits_per_weight(4096, 4096), 4) == 1.0078  # per original weight
    assert round(layer_bits_per_weight(11008, 4096), 4) == 1.0054


def test_llama7b_whole_model_matches_the_paper(llama7b_meta) -> None:
    r = footprint(llama7b_meta)
    assert r.quantized_layers == 32 * 7
    assert r.quantized_weights == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert r.other_params == 2 * 32000 * 4096 + 65 * 4096  # embed, lm_head, 65 RMSNorms
    assert round(r.fp16_bytes / 1e9, 1) == 13.5
    assert round(r.onebit_bytes / 1e9, 1) == 1.3
    assert 1.006 < r.bits_per_weight < 1.0063
    assert "13.48 GB" in r.format()


def test_report_is_the_same_before_and_after_quantization_and_packing() -> None:
    model = tiny_causal_lm("opt")
    before = footprint(model)
    quantize_(model, OneBitConfig())
    after = footprint(model)
    pack_(model)
    packed = footprint(model)
    assert before == after == packed
    stored = sum(  # as exported: row-major, ceil(in / 8) bytes per row
        m.state_dict()["packed_signs"].numel()
        for m in model.modules()
        if hasattr(m, "packed_signs")
    )
    assert stored == packed.packed_sign_bytes
    assert packed.bias_params == 2 * (3 * 32 + 32 + 64 + 32)  # OPT keeps its biases
