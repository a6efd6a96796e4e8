"""Where a OneBit student departs from its teacher: layer output scales, block errors, sign flips.

Plain PyTorch (no Lightning, no Hydra), for any teacher/student pair that share module names
(``quantize_`` swaps layers in place, so a student's ``model.layers.3.mlp.down_proj`` is the
teacher's ``model.layers.3.mlp.down_proj``), trained (``OneBitLinear``) or packed
(``PackedOneBitLinear``):

* **output scale** of every quantized layer, teacher and student each on its own inputs: the
  median and maximum over tokens of the per-token RMS of the output, and the largest ``|y|`` with
  the token and channel where it occurs. OneBit's output LayerNorm fixes a layer's per-token RMS
  near 1 (``|y| <= sqrt(out - 1)``), which a teacher's "massive activations" far exceed;
* **block error**: per decoder block, ``‖s − t‖ / ‖t‖`` of the residual stream after the block
  (the relative error of the hidden state), and the mean per-token cosine similarity;
* **attention**, per decoder block and for each model: the mean attention probability on the
  sequence's first token (the "attention sink" that LLaMA-class models build on it) and the mean
  entropy of the heads' attention, over every query after the first. A student that does not
  build the sink spreads its attention over the whole context, and does worse the longer it is;
* **perplexity by position**: teacher and student perplexity of the tokens predicted at positions
  ``[0, 8)``, ``[8, 32)``, ``[32, 128)``, ``[128, 512)``, ... of each sequence: whether the student
  uses its context as the teacher does;
* **sign flips**: the fraction of each layer's signs that differ from ``sign(W)`` of the teacher:
  the flips since initialisation with ``quant.sign_init=sign`` (both latent inits start at
  ``sign(W)``); with ``sign_init=gptq`` the signs GPTQ chose differently count too (compare with
  the first validation).

:func:`diagnose` returns a :class:`Diagnostics` report; ``python evaluate.py ... diagnose=true``
prints it for a model, a checkpoint or an export, and ``onebit.train.callbacks.Diagnostics`` logs it
during training.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from onebit.dist import full_tensor
from onebit.models import eager_attention
from onebit.quant.convert import find_decoder_blocks, iter_target_linears
from onebit.quant.linear import OneBitLinear
from onebit.quant.packed_linear import PackedOneBitLinear
from onebit.quant.ste import sign


@dataclass
class OutputScale:
    """Output statistics of one layer on a calibration batch (see the module docstring)."""

    rms_median: float  # median over tokens of the per-token RMS of y
    rms_max: float  # largest per-token RMS
    absmax: float  # largest |y|
    absmax_token: int  # flat token index (batch-major) of the largest |y|
    absmax_channel: int  # its output channel


@dataclass
class LayerDiagnostics:
    """One quantized layer: teacher and student output scales and the student's sign flips."""

    name: str
    out_features: int
    in_features: int
    teacher: OutputScale
    student: OutputScale | None  # None: no student, or the layer is full precision in it
    flip_frac: float | None  # None: no student, or the layer is full precision in it

    @property
    def rms_ratio(self) -> float | None:
        """Student over teacher median per-token RMS (1: the student writes the teacher's scale)."""
        if self.student is None:
            return None
        return self.student.rms_median / max(self.teacher.rms_median, 1e-30)


@dataclass
class BlockDiagnostics:
    """The residual stream after one decoder block, student against teacher."""

    index: int
    rel_err: float  # ‖s − t‖ / ‖t‖ over all tokens
    cosine: float  # mean over tokens of cos(s, t)
    teacher_rms_max: float  # largest per-token RMS of the teacher's hidden state
    teacher_sink: float | None = None  # mean attention on the first token (None: not measured)
    student_sink: float | None = None
    teacher_entropy: float | None = None  # mean entropy of the attention, in nats
    student_entropy: float | None = None


@dataclass
class PositionDiagnostics:
    """Perplexity of the tokens predicted at positions ``[start, end)`` of each sequence."""

    start: int
    end: int
    teacher_ppl: float
    student_ppl: float | None  # None: no student


@dataclass
class Diagnostics:
    """A report of :func:`diagnose`; ``format()`` prints it, ``to_dict()`` serialises it."""

    layers: list[LayerDiagnostics] = field(default_factory=list)
    blocks: list[BlockDiagnostics] = field(default_factory=list)
    positions: list[PositionDiagnostics] = field(default_factory=list)
    n_tokens: int = 0
    has_student: bool = False

    @property
    def flip_frac(self) -> float:
        """Fraction of all quantized signs that differ from the initialisation (weighted)."""
        num = den = 0.0
        for layer in self.layers:
            if layer.flip_frac is not None:
                n = layer.out_features * layer.in_features
                num += layer.flip_frac * n
                den += n
        return num / den if den else 0.0

    def summary(self) -> dict[str, float]:
        """Scalars for a logger: flips, block errors, the spread of the layers' scale ratios."""
        ratios = [r for r in (layer.rms_ratio for layer in self.layers) if r is not None]
        out = {"flip_frac": self.flip_frac}
        if self.blocks:
            errs = [b.rel_err for b in self.blocks]
            out["block_rel_err_mean"] = sum(errs) / len(errs)
            out["block_rel_err_max"] = max(errs)
            out["block_rel_err_last"] = errs[-1]
        for who in ("teacher", "student"):
            sinks = [getattr(b, f"{who}_sink") for b in self.blocks]
            if sinks and None not in sinks:
                out[f"attn_sink_{who}_mean"] = sum(sinks) / len(sinks)
        if self.positions and self.positions[-1].student_ppl is not None:
            last = self.positions[-1]
            out["ppl_ratio_last_positions"] = last.student_ppl / last.teacher_ppl
        if ratios:
            logs = sorted(math.log10(max(r, 1e-30)) for r in ratios)
            out["log10_rms_ratio_median"] = logs[len(logs) // 2]
            out["log10_rms_ratio_absmax"] = max(abs(v) for v in logs)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "has_student": self.has_student,
            "summary": self.summary(),
            "layers": [{**asdict(layer), "rms_ratio": layer.rms_ratio} for layer in self.layers],
            "blocks": [asdict(b) for b in self.blocks],
            "positions": [asdict(p) for p in self.positions],
        }

    def format(self, top: int = 10) -> str:
        """A text report: the block errors, then the ``top`` layers furthest from the teacher's
        scale and the ``top`` largest teacher outputs."""
        lines = [f"diagnostics on {self.n_tokens:,} tokens"]
        s = self.summary()
        lines.append(
            "signs that differ from the teacher's sign(W): "
            f"{100 * s['flip_frac']:.3f} % of the quantized weights"
        )
        if self.blocks:
            lines.append("")
            lines.append(
                "block  rel.err ‖s−t‖/‖t‖  cosine  teacher max token RMS  "
                "sink t / s (attention on token 0)  entropy t / s"
            )
            for b in self.blocks:
                lines.append(
                    f"{b.index:5d}  {b.rel_err:17.4f}  {b.cosine:6.3f}  {b.teacher_rms_max:21.2f}"
                    f"  {_pair(b.teacher_sink, b.student_sink, '.3f'):>33s}"
                    f"  {_pair(b.teacher_entropy, b.student_entropy, '.2f'):>13s}"
                )
        if self.positions:
            lines.append("")
            lines.append("positions      teacher ppl  student ppl  s/t")
            for p in self.positions:
                sp = f"{p.student_ppl:11.2f}" if p.student_ppl is not None else f"{'-':>11s}"
                ratio = p.student_ppl / p.teacher_ppl if p.student_ppl is not None else None
                lines.append(
                    f"{f'[{p.start}, {p.end})':13s} {p.teacher_ppl:11.2f}  {sp}  "
                    + (f"{ratio:.2f}" if ratio is not None else "-")
                )
        quantized = [layer for layer in self.layers if layer.student is not None]
        if quantized:
            lines.append("")
            lines.append(f"layers furthest from the teacher's output scale (top {top}):")
            lines.append(_layer_header())
            far = sorted(quantized, key=lambda r: -abs(math.log(max(r.rms_ratio, 1e-30))))
            lines += [_layer_line(r, True) for r in far[:top]]
        if self.layers:
            lines.append("")
            lines.append(f"largest teacher outputs (massive activations, top {top}):")
            lines.append(_layer_header())
            big = sorted(self.layers, key=lambda r: -r.teacher.absmax)
            lines += [_layer_line(r, self.has_student) for r in big[:top]]
        return "\n".join(lines)


def _pair(a: float | None, b: float | None, fmt: str) -> str:
    if a is None:
        return "-"
    return format(a, fmt) + (" / " + format(b, fmt) if b is not None else "")


def _layer_header() -> str:
    return (
        f"{'layer':42s} {'t rms':>8s} {'s rms':>8s} {'s/t':>8s} {'t max|y|':>10s} "
        f"{'s max|y|':>9s} {'t token':>7s} {'flips %':>8s}"
    )


def _layer_line(r: LayerDiagnostics, has_student: bool) -> str:
    s = r.student
    srms = f"{s.rms_median:8.3f}" if s else f"{'fp' if has_student else '-':>8s}"
    ratio = f"{r.rms_ratio:8.3g}" if s else f"{'-':>8s}"
    smax = f"{s.absmax:9.2f}" if s else f"{'-':>9s}"
    flips = f"{100 * r.flip_frac:8.3f}" if r.flip_frac is not None else f"{'-':>8s}"
    return (
        f"{r.name[-42:]:42s} {r.teacher.rms_median:8.3f} {srms} {ratio} "
        f"{r.teacher.absmax:10.2f} {smax} {r.teacher.absmax_token:7d} {flips}"
    )


def output_scale(y: Tensor) -> OutputScale:
    """:class:`OutputScale` of a layer output. Shapes: y (..., out)."""
    y = y.detach().float().reshape(-1, y.shape[-1])  # (tokens, out)
    rms = y.pow(2).mean(dim=1).sqrt()  # (tokens,)
    flat = int(y.abs().argmax())
    token, channel = divmod(flat, y.shape[1])
    return OutputScale(
        rms_median=float(rms.median()),
        rms_max=float(rms.max()),
        absmax=float(y.abs().max()),
        absmax_token=token,
        absmax_channel=channel,
    )


@torch.no_grad()
def layer_output_scales(
    model: nn.Module,
    ids: Tensor,
    names: Iterable[str],
    attention_mask: Tensor | None = None,
    attention: bool = False,
) -> tuple[dict[str, OutputScale], Any, list[tuple[float, float]] | None]:
    """Run ``model`` on ``ids`` with hooks on the modules ``names``; their output scales, the
    model's output (with hidden states) and, with ``attention``, :func:`attention_stats`'s list
    from the same forward, run with eager attention (None without ``attention``).

    Shapes: ids (batch, seq) → {name: OutputScale}, model output, [(sink, entropy)] * n_blocks.
    """
    modules = dict(model.named_modules())
    stats: dict[str, OutputScale] = {}
    hooks = []  # removed in `finally`, whatever raised
    try:
        collect = _attention_hooks(model, ids) if attention else None
        hooks += [] if collect is None else collect[0]
        for name in names:

            def hook(_mod, _inp, out, name=name):
                stats[name] = output_scale(out)

            hooks.append(modules[name].register_forward_hook(hook))
        with eager_attention(model) if collect is not None else contextlib.nullcontext():
            out = model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return stats, out, None if collect is None else collect[1]()


def _attention_hooks(model: nn.Module, ids: Tensor):
    """Hooks on each decoder block's attention module that reduce its probability maps (eager
    attention's second output) to the first token's mean share and the mean entropy, and a
    function returning them per block; None for a model without such modules."""
    _, blocks = find_decoder_blocks(model)
    attns = [getattr(b, "self_attn", None) or getattr(b, "attn", None) for b in blocks]
    if getattr(model, "config", None) is None or any(a is None for a in attns) or ids.shape[1] < 2:
        return None
    found: dict[int, tuple[float, float]] = {}

    def hook(i: int):
        def reduce(_mod, _inp, out):
            p = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if isinstance(p, Tensor) and p.dim() == 4:  # (batch, heads, query, key)
                p = p[:, :, 1:].float()
                entropy = -torch.special.xlogy(p, p).sum(-1)
                found[i] = (float(p[..., 0].mean()), float(entropy.mean()))

        return reduce

    hooks = [a.register_forward_hook(hook(i)) for i, a in enumerate(attns)]

    def result() -> list[tuple[float, float]] | None:
        return [found[i] for i in range(len(attns))] if len(found) == len(attns) else None

    return hooks, result


@torch.no_grad()
def attention_stats(
    model: nn.Module, ids: Tensor, attention_mask: Tensor | None = None
) -> list[tuple[float, float]] | None:
    """Per decoder block, the mean attention probability on the first token and the mean
    entropy (nats) of the attention, over batch, heads and every query after the first; None for
    a model whose blocks hold no ``self_attn`` / ``attn`` module returning its probabilities under
    eager attention. The maps are reduced as each block runs, never all held at once.

    Shapes: ids (batch, seq) → [(sink, entropy)] * n_blocks.
    """
    collect = _attention_hooks(model, ids)
    if collect is None:
        return None
    hooks, result = collect
    try:
        with eager_attention(model):
            model(input_ids=ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return result()


POSITION_EDGES = (0, 8, 32, 128, 512, 2048, 8192, 32768)


def position_perplexities(
    teacher_logits: Tensor,
    student_logits: Tensor | None,
    ids: Tensor,
    attention_mask: Tensor | None = None,
) -> list[PositionDiagnostics]:
    """Teacher and student perplexity of the next tokens predicted at positions
    ``[0, 8)``, ``[8, 32)``, ``[32, 128)``, ... (``POSITION_EDGES``, the last range cut at the
    sequence's end), padding left out.

    Shapes: logits (batch, seq, vocab); ids, attention_mask (batch, seq).
    """
    from onebit.distill.losses import next_token_nll

    n = ids.shape[1] - 1  # predicted positions 0 .. seq - 2
    nlls = {"t": next_token_nll(teacher_logits, ids, attention_mask)}
    if student_logits is not None:
        nlls["s"] = next_token_nll(student_logits, ids, attention_mask)
    out = []
    for start, end in itertools.pairwise(POSITION_EDGES):
        if start >= n:
            break
        end = min(end, n)
        ppl = {}
        for who, (nll, weight) in nlls.items():
            count = weight[:, start:end].sum()
            ppl[who] = math.exp(float(nll[:, start:end].sum() / count)) if count > 0 else math.nan
        out.append(PositionDiagnostics(start, end, ppl["t"], ppl.get("s")))
    return out


def student_signs(module: nn.Module) -> Tensor | None:
    """The ±1 signs a quantized layer uses (float32), or None for a full-precision layer; all of
    them for a layer sharded with FSDP2 (a collective then: every rank must call it).

    Shapes: → (out, in).
    """
    if isinstance(module, OneBitLinear | PackedOneBitLinear):
        return full_tensor(module.signs())
    return None


def teacher_signs(module: nn.Module) -> Tensor:
    """``sign(W)`` of a full-precision linear (``Conv1D`` transposed), 0 mapped to +1, as the
    student's initialisation; all of them for a sharded layer (a collective, as
    :func:`student_signs`). Shapes: → (out, in)."""
    w = full_tensor(module.weight.detach())
    if type(module).__name__ == "Conv1D":
        w = w.T
    return sign(w, torch.float32, "plus")


def block_errors(teacher_hidden, student_hidden) -> list[BlockDiagnostics]:
    """Per decoder block, the student's residual stream against the teacher's.

    ``*_hidden`` are Hugging Face ``hidden_states`` tuples (embedding output first); block ``i``'s
    output is entry ``i + 1`` (the last entry is after the final norm in LLaMA-style models).
    """
    out = []
    for i, (t, s) in enumerate(zip(teacher_hidden[1:], student_hidden[1:], strict=True)):
        t = t.detach().float().reshape(-1, t.shape[-1])
        s = s.detach().float().reshape(-1, s.shape[-1])
        rel = float((s - t).norm() / t.norm().clamp_min(1e-30))
        cos = float(torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12).mean())
        out.append(BlockDiagnostics(i, rel, cos, float(t.pow(2).mean(1).sqrt().max())))
    return out


@torch.no_grad()
def diagnose(
    teacher: nn.Module,
    student: nn.Module | None,
    ids: Tensor,
    attention_mask: Tensor | None = None,
) -> Diagnostics:
    """The report of the module docstring for ``student`` against ``teacher`` on ``ids``.

    With ``student=None`` only the teacher's output scales are reported (to find the layers
    that write massive activations before quantizing).

    Shapes: ids (batch, seq) token ids; attention_mask (batch, seq) or None.
    """
    names = [n for n, _ in iter_target_linears(teacher)]
    t_stats, t_out, t_att = layer_output_scales(
        teacher, ids, names, attention_mask, attention=student is not None
    )
    report = Diagnostics(n_tokens=int(ids.numel()), has_student=student is not None)
    s_stats: dict[str, OutputScale] = {}
    s_modules: dict[str, nn.Module] = {}
    s_out = None
    if student is not None:
        find_decoder_blocks(student)  # a clear error for a model without decoder blocks
        s_modules = dict(student.named_modules())
        missing = [n for n in names if n not in s_modules]
        if missing:
            raise ValueError(
                f"the student has no module {missing[0]!r} of the teacher: not the same "
                "architecture."
            )
        quantized = [n for n in names if student_signs(s_modules[n]) is not None]
        s_stats, s_out, s_att = layer_output_scales(
            student, ids, quantized, attention_mask, attention=True
        )
        report.blocks = block_errors(t_out.hidden_states, s_out.hidden_states)
        for i, b in enumerate(report.blocks):
            if t_att is not None:
                b.teacher_sink, b.teacher_entropy = t_att[i]
            if s_att is not None:
                b.student_sink, b.student_entropy = s_att[i]
    report.positions = position_perplexities(
        t_out.logits, None if s_out is None else s_out.logits, ids, attention_mask
    )
    t_modules = dict(teacher.named_modules())
    for name in names:
        flips, ref = None, teacher_signs(t_modules[name])  # (out, in), the initial signs
        if name in s_stats:
            s = student_signs(s_modules[name])
            flips = float((s != ref).float().mean())
        out_f, in_f = ref.shape
        report.layers.append(
            LayerDiagnostics(name, out_f, in_f, t_stats[name], s_stats.get(name), flips)
        )
    return report


def massive_layers(report: Diagnostics, factor: float = 1.0) -> list[str]:
    """The layers whose teacher output a LayerNorm'd OneBit layer cannot write: those with
    ``max |y| > factor · sqrt(out − 1)``, the largest entry a parameter-free LayerNorm allows
    (its output has per-token RMS 1, so at most one entry reaches ``sqrt(out − 1)``). Ordered
    from the largest ``max |y|``."""
    big = sorted(report.layers, key=lambda r: -r.teacher.absmax)
    return [r.name for r in big if r.teacher.absmax > factor * math.sqrt(r.out_features - 1)]


def keep_advice(report: Diagnostics, keep: int) -> tuple[list[str], list[str], str]:
    """The massive layers of ``report``, the ``keep`` furthest above ``sqrt(out − 1)`` (ranked by
    ``max |y| / sqrt(out − 1)``) and a paragraph telling the user how to keep them."""
    over = massive_layers(report)
    excess = {r.name: r.teacher.absmax / max(r.out_features - 1, 1) ** 0.5 for r in report.layers}
    ranked = sorted(over, key=lambda n: -excess[n])[:keep]
    text = (
        f"{len(over)} of {len(report.layers)} layers write entries above sqrt(out - 1), "
        "the most a OneBit layer with its output LayerNorm can"
    )
    if ranked:
        text += (
            f"; the {len(ranked)} furthest above it (max |y| / sqrt(out - 1)), to keep in full "
            f"precision:\n  quant.skip_modules=[{','.join(ranked)}]\n(or, at a fraction of the "
            "bits, keep only the weights that write them: quant.outliers=256, the default of "
            "quant=onebit)"
        )
    return over, ranked, text
