"""Memory planner: per-GPU memory of a OneBit distillation run, before launching it.

The architecture is built on the ``meta`` device (no weights are read or downloaded) and counted:
quantized weights ``n_q`` (latent, trained), value vectors ``n_gh`` (g and h, trained), and the
frozen full-precision rest ``n_fp`` (embeddings, norms, ``lm_head``). Per GPU, in bytes, with
``T`` = per-device batch × sequence length tokens, ``L`` blocks, hidden ``h``, intermediate ``i``,
vocabulary ``V``, ``H`` heads and sequence length ``s`` (reported in GiB):

    teacher          (n_q + n_fp) · 2               16-bit, frozen
    student          (n_q + n_gh) · 16 + n_fp · 2   trained: 16 bytes per parameter for fp32 master
                                                    weights, fp32 gradients and AdamW's two fp32
                                                    moments (ZeRO's "16Ψ" for mixed-precision Adam)
    buffers          per strategy                   FSDP: two blocks of teacher and student
                                                    unsharded in 16 bits (current + prefetch);
                                                    ZeRO-3: its all-gather and reduce buckets
    activations      T·L·h·2 + T·(14h + 7i)·2       with activation checkpointing: the block inputs,
                                                    and one block's saved tensors while it is
                                                    recomputed; without it, L blocks' saved tensors
    hidden states    T·(L + 1)·h·2 · k_h            the teacher's, kept for the MSE term (k_h = 1;
                                                    official: 3, with the normalised copies)
    logits           T·V · k_l                      ours: bf16 teacher and student logits and fp32
                                                    log-softmax, softmax and gradient (k_l = 16);
                                                    official: fp32 logits, KL and LM loss (32)
    attention        B·H·s²·14                      eager attention only (the official code): fp16
                                                    scores, fp32 softmax and their gradients, one
                                                    recomputed block (all L without checkpointing)
    overhead         fixed                          CUDA context, NCCL, allocator bookkeeping

The sharded strategies (``fsdp``, ``zero3``) divide the teacher and student rows by the world size;
``ddp`` replicates them. The sum is multiplied by ``reserve_factor`` for what PyTorch's caching
allocator reserves beyond what is allocated (fragmentation). Its default, 1.33, is calibrated on
the one public measurement we have (official issue #3: LLaMA-2-7B on 3×A100-80GB with the
official script reserved 80,406 of 81,920 MiB at per-device batch 3 and ran out of memory at 4;
our sum for batch 3 is 59.2 GiB, and 80,406 MiB / 59.2 GiB = 1.33), so that case is a fit, not an
independent check; the paper's 8-GPU batch-4 run, and batch 4 failing on 3 GPUs, are.

An estimate of the dominant terms, not an allocator trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onebit.models import llama_config

STRATEGIES = ("ddp", "fsdp", "zero3")
GIB = 1024**3


@dataclass
class PlanSettings:
    """What the run will do, per device."""

    strategy: str = "fsdp"
    world_size: int = 8
    batch_size: int = 4
    seq_len: int = 2048
    activation_checkpointing: bool = True
    recipe: str = "ours"  # ours | official (fp16 DeepSpeed, eager attention, fp32 logits)
    hidden_loss: bool = True
    gpu_gib: float = 80.0  # A100-80GB and H100-80GB: 81,920 MiB
    overhead_gb: float = 2.0
    reserve_factor: float = 1.33  # calibrated: see the module docstring

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}.")
        if self.recipe not in ("ours", "official"):
            raise ValueError(f"recipe={self.recipe!r} is not one of ours, official.")
        for key in ("world_size", "batch_size", "seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}.")


@dataclass
class ModelCounts:
    """Parameter counts of a causal LM as OneBit trains it."""

    quantized: int
    value_vectors: int
    full_precision: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    block_params: int  # parameters of one decoder block (for gather buffers)


@dataclass
class MemoryPlan:
    settings: PlanSettings
    counts: ModelCounts
    rows: dict[str, float] = field(default_factory=dict)  # bytes per GPU

    @property
    def total(self) -> float:
        """Bytes per GPU, the allocator's reserve included."""
        return sum(self.rows.values()) * self.settings.reserve_factor

    @property
    def fits(self) -> bool:
        return self.total <= self.settings.gpu_gib * GIB

    def format(self, name: str = "model") -> str:
        s, c = self.settings, self.counts
        head = (
            f"memory plan: {name}, {s.strategy} on {s.world_size} GPU(s) of {s.gpu_gib:g} GiB, "
            f"per-device batch {s.batch_size} × {s.seq_len} tokens, activation checkpointing "
            f"{'on' if s.activation_checkpointing else 'off'}"
            f", {s.recipe} recipe"
        )
        lines = [
            head,
            f"  parameters: {c.quantized:,} quantized, {c.value_vectors:,} g/h, "
            f"{c.full_precision:,} full precision ({c.layers} blocks, hidden {c.hidden})",
        ]
        for key, val in self.rows.items():
            lines.append(f"  {key:<18} {val / GIB:8.2f} GiB")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'sum':<18} {sum(self.rows.values()) / GIB:8.2f} GiB")
        lines.append(
            f"  {'total':<18} {self.total / GIB:8.2f} GiB per GPU (× {s.reserve_factor:g} "
            f"allocator reserve): {verdict} in {s.gpu_gib:g} GiB"
        )
        return "\n".join(lines)


def count_model(config) -> ModelCounts:
    """Counts from a Hugging Face config: the model is built on ``meta`` and quantized there."""
    import torch
    from transformers import AutoModelForCausalLM

    from onebit.quant import OneBitConfig, OneBitLinear, quantize_

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        quantize_(model, OneBitConfig(svid_method="none"))
    quant = gh = 0
    for m in model.modules():
        if isinstance(m, OneBitLinear):
            quant += m.weight.numel()
            gh += m.in_scale.numel() + m.out_scale.numel() + (m.bias.numel() if m.bias else 0)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    from onebit.quant.convert import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    block_params = sum(p.numel() for p in blocks[0].parameters())
    hidden = config.hidden_size
    return ModelCounts(
        quantized=quant,
        value_vectors=gh,
        full_precision=total - quant - gh,
        layers=len(blocks),
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        heads=config.num_attention_heads,
        vocab=config.vocab_size,
        block_params=block_params,
    )


def plan_memory(counts: ModelCounts, settings: PlanSettings) -> MemoryPlan:
    """Per-GPU bytes of each component (see the module docstring)."""
    s, c = settings, counts
    shard = s.world_size if s.strategy in ("fsdp", "zero3") else 1
    official = s.recipe == "official"
    trainable = c.quantized + c.value_vectors
    tokens = s.batch_size * s.seq_len
    block_saved = tokens * (14 * c.hidden + 7 * c.intermediate) * 2
    rows: dict[str, float] = {
        "teacher": (c.quantized + c.full_precision) * 2 / shard,
        "student": (trainable * 16 + c.full_precision * 2) / shard,
    }
    if s.strategy == "fsdp" and shard > 1:
        rows["buffers"] = 2 * 2 * c.block_params * 2  # 2 blocks × (teacher, student), 16-bit
    elif s.strategy == "zero3":
        rows["buffers"] = 2 * 5e8 * 2  # all-gather and reduce buckets of 5e8 16-bit values
    if s.activation_checkpointing:
        rows["activations"] = tokens * c.layers * c.hidden * 2 + block_saved
    else:
        rows["activations"] = c.layers * block_saved
    if s.hidden_loss:
        rows["hidden states"] = tokens * (c.layers + 1) * c.hidden * 2 * (3 if official else 1)
    rows["logits"] = tokens * c.vocab * (32 if official else 16)
    if official:
        blocks_alive = 1 if s.activation_checkpointing else c.layers
        rows["attention"] = s.batch_size * c.heads * s.seq_len**2 * 14 * blocks_alive
    rows["overhead"] = s.overhead_gb * GIB
    return MemoryPlan(settings, counts, rows)


KNOWN_ARCHITECTURES = {  # planned offline when the Hub is unreachable (LLaMA-2 has the same shapes)
    "llama7b": lambda: llama_config("7b"),
    "llama2_7b": lambda: llama_config("7b"),
    "llama13b": lambda: llama_config("13b"),
    "llama2_13b": lambda: llama_config("13b"),
}


def plan_run(cfg) -> dict[str, Any]:
    """Print the per-GPU memory plan of ``train.py``'s config ``cfg`` (``plan.enabled=true``):
    the model's architecture from its config alone (offline: the published LLaMA shapes), the
    run's batch, sequence length, strategy and activation checkpointing; returns the total."""
    from omegaconf import OmegaConf

    from onebit.errors import OneBitInputError
    from onebit.models import ModelSpec, model_config

    spec = ModelSpec.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    try:
        config = model_config(spec)
    except OneBitInputError:
        if spec.name not in KNOWN_ARCHITECTURES:
            raise
        config = KNOWN_ARCHITECTURES[spec.name]()  # offline: the published architecture
    p, t = cfg.plan, cfg.trainer
    world = p.world_size
    if world is None:
        devices, nodes = t.get("devices", 1), t.get("num_nodes", 1) or 1
        world = devices * nodes if isinstance(devices, int) else 8
    from onebit.train.build import strategy_name

    strategy = p.strategy or ("fsdp" if "fsdp" in strategy_name(t.get("strategy")) else "ddp")
    try:
        settings = PlanSettings(
            strategy=strategy,
            world_size=int(world),
            batch_size=int(cfg.data.batch_size),
            seq_len=int(cfg.data.seq_len),
            activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
            recipe=p.recipe,
            hidden_loss=float(cfg.loss.get("hidden_weight", 1.0)) > 0,
            gpu_gib=float(p.gpu_gib),
        )
    except ValueError as e:
        raise OneBitInputError(f"plan: {e}") from None
    result = plan_memory(count_model(config), settings)
    print(result.format(spec.name))
    return {"plan_gib": result.total / 2**30, "fits": result.fits}
