"""onebit.decoder: the C++ decode step equals the model's own forward (logits to fp32 rounding,
greedy tokens identical) for every packed-layer variant, kept full-precision layers, fp16 and bf16
weights, the head sizes with their own attention code and every kernel instruction set; it names
what it does not support, and generate() falls back to the forward there."""

from __future__ import annotations

import pytest
import torch

from onebit import kernels
from onebit.decoder import StepDecoder, unsupported
from onebit.export import load_onebit, save_onebit
from onebit.generation import generate
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, freeze_, quantize_

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the C++ kernels")


def _export(tmp_path, arch: str = "llama", cfg: OneBitConfig | None = None, dtype=torch.float32,
            seed: int = 0, **overrides):  # fmt: skip
    """A tiny trained-looking student of ``arch``, exported and loaded as packed layers."""
    cfg = cfg or OneBitConfig()
    student = freeze_(quantize_(tiny_causal_lm(arch, seed=seed, **overrides), cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as after training: every value vector and kept weight moved
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in student.named_buffers():
            if name.endswith("outlier_value"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    path = save_onebit(student, tmp_path / f"{arch}-{seed}", cfg, dtype)
    return load_onebit(path).eval()


def _compare(model, steps: int = 12, prompt: int = 7, reference=None) -> float:
    """Run the prompt through ``model``, then ``steps`` greedy tokens through the step decoder
    and through ``reference`` (default: the model) with its cache; returns the largest
    |difference| of the logits over max |logit|, asserting equal tokens."""
    reference = reference or model
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=gen)
    with torch.no_grad():
        out = reference(input_ids=ids, use_cache=True)
        dec = StepDecoder(model, prompt + steps)
        dec.load_cache(out.past_key_values, prompt)
        cache, nxt, worst = out.past_key_values, out.logits[:, -1].argmax(-1), 0.0
        for pos in range(prompt, prompt + steps):
            ref = reference(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            cache, want = ref.past_key_values, ref.logits[:, -1].float()
            got = dec.step(int(nxt), pos)
            assert got.shape == want.shape and got.dtype == torch.float32
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            assert torch.equal(got.argmax(-1), want.argmax(-1)), f"greedy token differs at {pos}"
            nxt = want.argmax(-1)
    return worst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize(
    "cfg",
    [
        OneBitConfig(),
        OneBitConfig(output_norm=False, output_gain=True, outliers=5),
        OneBitConfig(output_gain=True, outliers=3),
    ],
    ids=["paper", "gain-outliers-no-ln", "gain-outliers-ln"],
)
def test_the_step_equals_the_forward_in_fp32(tmp_path, arch, cfg) -> None:
    model = _export(tmp_path, arch, cfg)
    assert unsupported(model, 32) is None
    assert _compare(model) < 1e-5


def test_kept_full_precision_layers_run_as_dense_gemv(tmp_path) -> None:
    cfg = OneBitConfig(skip_modules=("*.0.mlp.down_proj", "*.1.self_attn.q_proj"))
    model = _export(tmp_path, "llama", cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, torch.nn.Linear)
    assert _compare(model) < 1e-5


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_head_sizes_with_their_own_attention_code(tmp_path, head_dim) -> None:
    model = _export(tmp_path, "llama", hidden_size=2 * head_dim, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=head_dim)  # fmt: skip
    assert model.model.layers[0].self_attn.head_dim == head_dim
    assert _compare(model, steps=20, prompt=40) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_and_bf16_weights_give_the_fp32_forward_of_the_same_weights(tmp_path, dtype) -> None:
    """The step widens the stored weights and computes in fp32, so it equals the forward of the
    same weights in fp32 (and is more exact than the model's own fp16/bf16 forward)."""
    model = _export(tmp_path, "llama", dtype=dtype)
    assert model.lm_head.weight.dtype == dtype
    wide = load_onebit(tmp_path / "llama-0", dtype=torch.float32).eval()
    assert _compare(model, reference=wide) < 1e-5


@pytest.mark.parametrize("isa", kernels.ISAS)
def test_every_instruction_set(tmp_path, isa) -> None:
    cfg = OneBitConfig(output_gain=True, outliers=2)
    model = _export(tmp_path, "llama", cfg, hidden_size=128, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=64)  # fmt: skip
    with kernels.forced_isa(isa):
        assert _compare(model, steps=8) < 1e-5


def test_generate_uses_the_step_and_gives_the_forwards_tokens(tmp_path) -> None:
    model = _export(tmp_path, "llama")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    step, s1 = generate(model, ids, 20, decoder="step")
    fwd, s2 = generate(model, ids, 20, decoder="model")
    auto, s3 = generate(model, ids, 20)
    assert (s1.decoder, s2.decoder, s3.decoder) == ("step", "model", "step")
    assert torch.equal(step, fwd) and torch.equal(auto, fwd)
    a, _ = generate(model, ids, 10, do_sample=True, top_k=20, seed=3, decoder="step")
    b, _ = generate(model, ids, 10, do_sample=True, top_k=20, seed=3, decoder="model")
    assert torch.equal(a, b)


def test_what_it_does_not_support_is_named_and_generate_falls_back(tmp_path) -> None:
    gpt2 = tiny_causal_lm("gpt2")
    assert "model type 'gpt2'" in unsupported(gpt2, 16)
    llama = _export(tmp_path, "llama")
    assert "batch 2" in unsupported(llama, 16, batch=2)
    mistral = tiny_causal_lm("mistral", sliding_window=8)
    assert "sliding window of 8" in unsupported(mistral, 16)
    assert unsupported(mistral, 8) is None
    ids = torch.randint(0, 128, (1, 4))
    _, stats = generate(gpt2, ids, 5)
    assert stats.decoder == "model"
    with pytest.raises(ValueError, match="decoder=step cannot run this model: model type 'gpt2'"):
        generate(gpt2, ids, 5, decoder="step")
    with pytest.raises(ValueError, match="decoder='fast' is not one of auto, step, model"):
        generate(gpt2, ids, 5, decoder="fast")
    two = torch.randint(0, 128, (2, 4))
    out, stats = generate(llama, two, 5)
    assert stats.decoder == "model" and out.shape == (2, 9)


def test_positions_outside_the_cache_are_refused(tmp_path) -> None:
    model = _export(tmp_path, "llama")
    dec = StepDecoder(model, 8)
    with pytest.raises(RuntimeError, match="position 8 is outside the cache of 8"):
        dec.step(1, 8)
    with pytest.raises(RuntimeError, match="token 9999 is outside the vocabulary"):
        dec.step(9999, 0)
    with pytest.raises(ValueError, match="9 cached positions exceed the decoder's 8"):
        dec.load_cache(None, 9)
