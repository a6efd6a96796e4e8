"""The decode step of a packed LLaMA-family model as one C++ call
(``torch.classes.onebit.Decoder``).

A token of decode through the model's own forward runs some 20 Python-level modules per block
(210 packed layers, norms, RoPE, attention, the cache) and at SmolLM2-135M's size that overhead,
not the weights, sets the speed. :class:`StepDecoder` hands the model's tensors (shared, not
copied) to a C++ object that runs a whole step, every block and the output layer, on fp32
buffers and a static KV cache: the embedding row, RMSNorm, q/k/v (with Qwen3's per-head RMSNorm
of q and k), RoPE, attention, o, the SiLU MLP and the residuals, the final norm and ``lm_head``.
Packed layers run the same kernel as
:class:`~onebit.quant.PackedOneBitLinear`; full-precision ones (kept layers, ``lm_head``) a GEMV
that reads fp32/fp16/bf16 weights as stored and accumulates in fp32.

It covers LLaMA, Mistral (within its sliding window), Qwen2, Qwen3 and SmolLM-style models with
packed or full-precision linears, batch 1, on the CPU with the C++ kernels; :func:`unsupported`
names what rules a model out, and :func:`onebit.generation.generate` then uses the model's
forward.
The arithmetic is fp32 throughout: on a model in fp32 the logits equal the forward's to fp32
rounding (other summation orders); on an fp16/bf16 model they are *more* exact than the forward,
which rounds activations to that dtype between ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onebit import kernels
from onebit.hf import base_model_type
from onebit.quant.packed_linear import PackedOneBitLinear

BASES = ("llama", "mistral", "qwen2", "qwen3")  # architectures whose block the C++ step computes
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# a block's linears, in the order Decoder.add_block takes them
_LINEARS = tuple(f"self_attn.{n}" for n in _PROJ) + tuple(f"mlp.{n}" for n in _MLP)
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies that do not change with length


def _linear_parts(m: nn.Module) -> str | None:
    if isinstance(m, (PackedOneBitLinear, nn.Linear)):
        return None
    return f"{type(m).__name__} (only packed 1-bit or nn.Linear layers)"


def unsupported(model: nn.Module, max_len: int, batch: int = 1) -> str | None:
    """Why :class:`StepDecoder` cannot run ``model`` for ``max_len`` positions, or None."""
    if batch != 1:
        return f"batch {batch} (the step decoder runs batch 1)"
    if not kernels.available():
        return "the C++ kernels are not available"
    cfg = getattr(model, "config", None)
    base = base_model_type(str(getattr(cfg, "model_type", "")))
    if base not in BASES:
        return f"model type {base!r} (the step decoder runs {', '.join(BASES)})"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a LLaMA-style decoder (model.model.layers, lm_head)"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act={getattr(cfg, 'hidden_act', None)!r} (the step decoder runs SiLU)"
    rope = getattr(inner, "rotary_emb", None)
    rope_type = getattr(rope, "rope_type", None)
    if rope is None or rope_type not in _ROPE_TYPES:
        return f"RoPE type {rope_type!r} (supported: {', '.join(_ROPE_TYPES)})"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and max_len > window:
        return f"{max_len} positions exceed the sliding window of {window}"
    for i, layer in enumerate(layers):
        att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            att is None
            or mlp is None
            or not all(hasattr(att, n) for n in _PROJ)
            or not all(hasattr(mlp, n) for n in _MLP)
        ):
            return f"block {i} is not a LLaMA block (self_attn q/k/v/o, mlp gate/up/down)"
        norms = [getattr(att, n, None) for n in ("q_norm", "k_norm")]
        if any(n is not None for n in norms) and not all(
            hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms
        ):
            return f"block {i} normalises q and k other than by two per-head RMSNorms"
        for n in _LINEARS:
            why = _linear_parts(layer.get_submodule(n))
            if why:
                return f"block {i} {n} is a {why}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, norm, None), "weight"):
                return f"block {i} has no {norm} with a weight"
    if not isinstance(model.lm_head, nn.Linear) or any(
        t.device.type != "cpu" for t in model.parameters()
    ):
        return "lm_head is not an nn.Linear, or the model is not on the CPU"
    return None


class StepDecoder:
    """One decode step of ``model`` as one C++ call, with a static KV cache of ``max_len``.

    Use: run the prompt through the model (``use_cache=True``), :meth:`load_cache` its cache, then
    :meth:`step` each new token at its position. Raises ``ValueError`` naming what is unsupported.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        why = unsupported(model, max_len)
        if why:
            raise ValueError(f"the step decoder cannot run this model: {why}.")
        cfg, inner = model.config, model.model
        att0 = inner.layers[0].self_attn
        head_dim = int(att0.head_dim)
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        rope = inner.rotary_emb
        lm_bias = model.lm_head.bias
        self.max_len = max_len
        self._d = torch.classes.onebit.Decoder(
            n_heads, n_kv, head_dim, max_len, float(inner.norm.variance_epsilon),
            float(att0.scaling), rope.inv_freq.float(), float(rope.attention_scaling),
            inner.embed_tokens.weight.detach(), inner.norm.weight.detach(),
            model.lm_head.weight.detach(), None if lm_bias is None else lm_bias.detach(),
        )  # fmt: skip
        for layer in inner.layers:
            ids = [self._add(layer.get_submodule(n)) for n in _LINEARS]
            qn, kn = (
                getattr(layer.self_attn, "q_norm", None),
                getattr(layer.self_attn, "k_norm", None),
            )
            self._d.add_block(
                layer.input_layernorm.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                *ids,
                None if qn is None else qn.weight.detach(),
                None if kn is None else kn.weight.detach(),
                float(qn.variance_epsilon) if qn is not None else 1e-6,
            )

    def _add(self, m: nn.Module) -> int:
        if isinstance(m, PackedOneBitLinear):
            return self._d.add_packed(
                m.packed_signs, m.in_scale, m.out_scale, m.out_gain, m.bias, m.outlier_index,
                m.outlier_value, bool(m.output_norm), float(m.norm_eps),
            )  # fmt: skip
        bias = None if m.bias is None else m.bias.detach()
        return self._d.add_dense(m.weight.detach(), bias)

    def load_cache(self, cache, length: int) -> None:
        """Copy the first ``length`` positions of a transformers cache (keys and values of shape
        (1, kv_heads, length, head_dim) per block) into the static cache."""
        if length > self.max_len:
            raise ValueError(f"{length} cached positions exceed the decoder's {self.max_len}.")
        for i, layer in enumerate(cache.layers):
            k = layer.keys[0, :, :length].float()
            v = layer.values[0, :, :length].float()
            self._d.set_cache(i, k, v)

    def step(self, token: int, pos: int) -> Tensor:
        """The logits (1, vocab) fp32 for ``token`` at position ``pos``; positions before it
        must be in the cache (from :meth:`load_cache` and earlier steps)."""
        return self._d.step(int(token), int(pos)).unsqueeze(0)
