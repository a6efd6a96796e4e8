"""The results table: a OneBit student against untrained 1-bit baselines and its own ablations.

    python benchmarks/results.py experiment=results_stories260k      # ~10 min, 1 thread
    python benchmarks/results.py experiment=results_smollm2_135m     # ~2 h on 2 CPU cores
    python benchmarks/results.py experiment=results_smollm2_135m 'rows=[teacher,onebit]' \
        train.steps=5000 eval.max_windows=null eval.limit=null       # a bigger budget, full eval

One row per method, every row evaluated by the same code on the same tokens (``onebit.eval``):

    teacher       the full-precision teacher
    xnor          sign(W) · mean|W| per output row, no training: a OneBitLinear with g = 1,
                  h = mean|W| of the row and no LayerNorm, i.e. exactly ``x · xnor_approx(W)ᵀ``
    svid          the OneBit student as initialised (SVID, output LayerNorm), no training
    svid_no_ln    sign(W) ⊙ a bᵀ without the LayerNorm: the best rank-1 sign-value approximation
    onebit        OneBit distilled for ``train.steps`` steps
    <ablation>    OneBit distilled for ``train.ablation_steps`` steps with one key of quant/loss
                  changed (``ref`` is the unchanged recipe at that budget)

Every trained row is what ``python train.py`` runs: ``onebit.train.module.OneBitDistillation``
(SVID and calibration in ``configure_model``, the block-wise stage, ``training_step``, the
numerical guards, the optimizer and schedule) fitted by a Lightning ``Trainer``; only the text and
the evaluation are the benchmark's. Every run reads the same training blocks in the same seeded
order. Writes ``results.json``, ``results.csv``, ``curves.csv`` and ``results.md`` to the run
directory, the plot to ``plot``, and a W&B run. Each row is also written to ``rows/<key>.json`` as
it finishes, and each trained student exported to ``students/<key>/`` (``save_students``), so a
run that dies keeps what it finished: ``resume_dir=<that directory>`` reuses those rows.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from harness import header
from omegaconf import DictConfig

from onebit.config_utils import register_resolvers
from onebit.eval.zeroshot import PAPER_COLUMNS
from onebit.train.build import container

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("onebit.results")

BASELINE_LABELS = {
    "teacher": "full precision (teacher)",
    "xnor": "XNOR sign(W)·mean|W|, no training",
    "svid": "SVID init (OneBit, with LN), no training",
    "svid_no_ln": "SVID sign(W)⊙abᵀ without LN, no training",
}
UNTRAINED_ONEBIT = tuple(k for k in BASELINE_LABELS if k != "teacher")  # the 1-bit ones
PPL_COLUMNS = {"wikitext2": "Wiki2", "c4": "C4", "generated": "Gen."}


def ppl_column(name: str) -> str:
    """A perplexity column's heading: ``wikitext2`` → Wiki2, ``c4@128`` → C4@128."""
    base, at, length = name.partition("@")
    return PPL_COLUMNS.get(base, base) + at + length


# -- students -------------------------------------------------------------------------------------
def onebit_student(teacher, quant):
    """The OneBit student of ``teacher``: SVID-initialised OneBitLinear layers, the rest frozen."""
    from onebit.quant import OneBitLinear, freeze_, quantize_

    student = quantize_(copy.deepcopy(teacher), quant)
    for layer in student.modules():  # fp32 masters, as OneBitDistillation keeps them
        if isinstance(layer, OneBitLinear):
            layer.float()
    return freeze_(student)


def xnor_student(teacher):
    """The XNOR baseline ``sign(W) · mean|W|`` (per output row) as a OneBitLinear model.

    Each layer is a OneBitLinear with latent weight W, g = 1, h = mean|W| of the row and no
    LayerNorm, so it computes ``x · (sign(W) ⊙ mean|W|)ᵀ = F.linear(x, xnor_approx(W))``.
    """
    import torch

    from onebit.quant import OneBitConfig, OneBitLinear

    student = onebit_student(
        teacher, OneBitConfig(svid_method="none", latent_init="weight", output_norm=False)
    )
    with torch.no_grad():
        for layer in student.modules():
            if isinstance(layer, OneBitLinear):
                layer.out_scale.copy_(layer.weight.abs().mean(dim=1))
    return student


class LongSteps(NamedTuple):
    """More training steps on other (longer) sequences: ``steps`` steps of ``batch_size``
    sequences of ``seq_len`` tokens of the row's text, spread evenly among the row's own steps
    (the learning-rate schedule spans both; at the end of a cosine schedule the rate is near 0)."""

    seq_len: int
    batch_size: int
    steps: int


class Arm(NamedTuple):
    """One trained row's recipe: the base config with one ablation's overrides."""

    label: str
    quant: Any  # OneBitConfig
    loss: Any  # DistillLossConfig
    optim: Any  # OptimConfig
    seq_len: int  # training sequence length
    batch_size: int  # sequences per step
    keep_massive: int  # keep full precision the k layers that most exceed a OneBit layer's range
    blockwise: Any = None  # BlockwiseConfig: block-wise reconstruction before distillation
    steps: int | None = None  # distillation steps; None: the row's default (train.steps or
    # train.ablation_steps), e.g. fewer for an arm whose block-wise stage takes training time
    source: str | None = None  # training text (c4 | self_generated); None: data.source
    calibration_seq_len: int | None = None  # tokens per calibration sequence; None: seq_len
    long_steps: LongSteps | None = None  # steps on longer sequences among the row's own


ARM_KEYS = ("label", "quant", "loss", "optim", "data", "train", "keep_massive", "blockwise")


def base_arm(cfg: DictConfig, label: str = "OneBit") -> Arm:
    """The recipe of the main OneBit row: ``quant``, ``loss``, ``optim``, ``data``, ``train``,
    ``blockwise``."""
    from onebit.distill import BlockwiseConfig, DistillLossConfig
    from onebit.distill.recipe import OptimConfig
    from onebit.quant import OneBitConfig

    return Arm(
        label,
        OneBitConfig.from_dict(container(cfg.quant)),
        DistillLossConfig.from_dict(container(cfg.loss)),
        OptimConfig.from_dict(container(cfg.optim)),
        int(cfg.data.seq_len),
        int(cfg.train.batch_size),
        _count(cfg.train.get("keep_massive", 0), "train.keep_massive"),
        BlockwiseConfig.from_dict(container(cfg.get("blockwise")) or {}),
    )


def _count(value: Any, key: str) -> int:
    from onebit.errors import OneBitInputError

    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise OneBitInputError(f"{key}={value!r} must be an integer >= 0.")


def _steps(value: Any, key: str) -> int | None:
    from onebit.errors import OneBitInputError

    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise OneBitInputError(f"{key}={value!r} must be an integer >= 1.")


def apply_overrides(cfg: DictConfig, spec: dict[str, Any] | None, where: str) -> Arm:
    """The base recipe with the overrides ``spec`` (``quant``, ``loss``, ``optim``: their keys;
    ``data``: ``seq_len``, ``source``, ``calibration_seq_len``; ``train``: ``batch_size``,
    ``steps``, ``long_steps`` (:class:`LongSteps`' keys); ``keep_massive``: a number of layers;
    ``blockwise``: the keys of the block-wise stage (``onebit.distill.BlockwiseConfig``);
    ``label``), each key checked; ``where`` names the node in messages."""
    import dataclasses

    from onebit.distill import BlockwiseConfig, DistillLossConfig
    from onebit.distill.recipe import OptimConfig
    from onebit.errors import OneBitInputError
    from onebit.quant import OneBitConfig

    base = base_arm(cfg)
    spec = spec or {}
    unknown = set(spec) - set(ARM_KEYS)
    if unknown:
        raise OneBitInputError(
            f"{where} has unknown key(s) {sorted(unknown)}; valid: {', '.join(ARM_KEYS)}."
        )
    for group, allowed in (
        ("data", {"seq_len", "source", "calibration_seq_len"}),
        ("train", {"batch_size", "steps", "long_steps"}),
    ):
        bad = set(spec.get(group) or {}) - allowed
        if bad:
            raise OneBitInputError(
                f"{where}.{group} has unknown key(s) {sorted(bad)}; valid: "
                f"{', '.join(sorted(allowed))}."
            )
    return Arm(
        spec.get("label", base.label),
        OneBitConfig.from_dict({**base.quant.to_dict(), **(spec.get("quant") or {})}),
        DistillLossConfig.from_dict({**container(cfg.loss), **(spec.get("loss") or {})}),
        OptimConfig.from_dict({**container(cfg.optim), **(spec.get("optim") or {})}),
        int((spec.get("data") or {}).get("seq_len", base.seq_len)),
        int((spec.get("train") or {}).get("batch_size", base.batch_size)),
        _count(spec.get("keep_massive", base.keep_massive), f"{where}.keep_massive"),
        BlockwiseConfig.from_dict(
            {**dataclasses.asdict(base.blockwise), **(spec.get("blockwise") or {})}
        ),
        _steps((spec.get("train") or {}).get("steps"), f"{where}.train.steps"),
        _source((spec.get("data") or {}).get("source"), f"{where}.data.source"),
        _steps(
            (spec.get("data") or {}).get("calibration_seq_len"), f"{where}.data.calibration_seq_len"
        ),
        _long_steps((spec.get("train") or {}).get("long_steps"), f"{where}.train.long_steps"),
    )


def _long_steps(value: Any, key: str) -> LongSteps | None:
    from onebit.errors import OneBitInputError

    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(LongSteps._fields):
        raise OneBitInputError(
            f"{key}={value!r} must give {', '.join(LongSteps._fields)} (e.g. "
            "{seq_len: 2048, batch_size: 1, steps: 16})."
        )
    return LongSteps(*(_steps(value[k], f"{key}.{k}") for k in LongSteps._fields))


DATA_SOURCES = ("self_generated", "c4")


def _source(value: Any, key: str) -> str | None:
    from onebit.errors import OneBitInputError

    if value is None or value in DATA_SOURCES:
        return value
    raise OneBitInputError(f"{key}={value!r} is not one of {', '.join(DATA_SOURCES)}.")


def main_arm(cfg: DictConfig) -> Arm:
    """The main OneBit row: the base recipe with ``main``'s overrides (the recommended recipe;
    the ablations and levers stay relative to the base, the paper's layer)."""
    arm = apply_overrides(cfg, main_spec(cfg), "main")
    label = arm.label if (cfg.get("main") or {}).get("label") else "OneBit"
    return arm._replace(label=f"{label}, {arm.steps or int(cfg.train.steps)} steps")


def main_spec(cfg: DictConfig) -> dict[str, Any] | None:
    """``main``'s overrides, with its ``base`` (an ablation's key) resolved as an ablation's is
    (:func:`ablation_spec`); the label only when ``main`` names one."""
    spec = container(cfg.get("main"))
    if not spec or "base" not in spec:
        return spec
    resolved = ablation_spec(container(cfg.ablations) or {}, "main", spec, "main")
    if "label" not in spec:
        resolved.pop("label")
    return resolved


def ablation_configs(cfg: DictConfig) -> dict[str, Arm]:
    """Ablation key → :class:`Arm`, each the base recipe with that ablation's overrides
    (:func:`apply_overrides`, after :func:`ablation_spec` has resolved its ``base``)."""
    from onebit.errors import OneBitInputError

    specs = container(cfg.ablations) or {}
    out = {}
    for key in specs:
        if key in BASELINE_LABELS or key == "onebit":
            raise OneBitInputError(f"ablations.{key}: the name is taken by a row; rename it.")
        out[key] = apply_overrides(cfg, ablation_spec(specs, key), f"ablations.{key}")
    return out


def ablation_spec(
    specs: dict[str, Any], key: str, spec: dict[str, Any] | None = None, node: str | None = None
) -> dict[str, Any]:
    """Ablation ``key``'s overrides with its ``base`` (another ablation's key) resolved: the base's
    overrides (its own base first), then this row's on top, group by group (``quant``, ``loss``,
    ``optim``, ``data``, ``train``, ``blockwise`` key by key; ``keep_massive`` replaced). The label
    is this row's own, or its key. ``spec`` and ``node`` (the config node named in messages)
    serve a row that is not in ``specs`` (``main``)."""
    from onebit.errors import OneBitInputError

    node = node or f"ablations.{key}"
    chain = [key]
    spec = dict((specs[key] if spec is None else spec) or {})
    while "base" in spec:
        parent = spec.pop("base")
        where = f"{node if len(chain) == 1 else 'ablations.' + chain[-1]}.base"
        if parent not in specs:
            raise OneBitInputError(
                f"{where}={parent!r} is not an ablation; valid: {', '.join(specs)}."
            )
        if parent in chain:
            raise OneBitInputError(
                f"{where}={parent!r} makes a cycle: {' -> '.join([*chain, parent])}."
            )
        chain.append(parent)
        merged = {k: v for k, v in (specs[parent] or {}).items() if k != "label"}
        for group, value in spec.items():  # groups (dicts) merge key by key; the rest replaces
            merged[group] = (
                {**(merged.get(group) or {}), **value} if isinstance(value, dict) else value
            )
        spec = merged
    return {"label": key, **spec}


# -- data -----------------------------------------------------------------------------------------
def c4_train_blocks(tokenizer, path: str, seq_len: int, max_doc_tokens: int) -> Any:
    """Training blocks from the C4 documents of at most ``max_doc_tokens`` tokens.

    ``onebit.eval.perplexity.c4_ids`` draws evaluation windows only from documents *longer* than
    its ``seqlen``, so with ``max_doc_tokens = seqlen`` no evaluated token is trained on. Documents
    are tokenised as the evaluation tokenises them, joined with EOS and cut into blocks.

    Shapes: → (n_blocks, seq_len) int64.
    """
    import torch

    from onebit.data.text import pack_blocks
    from onebit.eval.perplexity import _c4_docs

    eos = tokenizer.eos_token_id
    docs = []
    for text in _c4_docs(path):
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= max_doc_tokens:
            docs.append(ids + ([eos] if eos is not None else []))
    return torch.tensor(list(pack_blocks(docs, seq_len)), dtype=torch.long)


def generated_blocks(cfg: DictConfig, spec, seq_len: int) -> tuple[Any, Any]:
    """(training, held-out) blocks the teacher writes (``data.num_sequences`` and
    ``data.val_sequences`` of ``seq_len`` tokens), cached under ``data.cache_dir``.
    Shapes: → (n, seq_len) int64 each."""
    from onebit.data.self_generated import SelfGeneratedDataModule

    d = cfg.data
    dm = SelfGeneratedDataModule(
        spec,
        num_sequences=int(d.num_sequences),
        val_sequences=int(d.val_sequences),
        seq_len=seq_len,
        gen_batch_size=int(d.gen_batch_size),
        cache_dir=str(d.cache_dir),
        seed=int(cfg.seed),
        device="cpu",
    )
    dm.prepare_data()
    dm.setup()
    return dm.train_blocks.long(), dm.val_blocks.long()


def load_data(cfg: DictConfig, spec, tokenizer) -> tuple[Any, Any | None]:
    """(training blocks, held-out generated blocks or None). Shapes: (n, seq_len) each."""
    from onebit.errors import OneBitInputError

    d = cfg.data
    if d.source == "self_generated":
        return generated_blocks(cfg, spec, int(d.seq_len))
    if d.source == "c4":
        blocks = c4_train_blocks(tokenizer, d.c4_path, int(d.seq_len), int(cfg.eval.seqlen))
        return blocks, None
    raise OneBitInputError(f"data.source={d.source!r} is not one of {', '.join(DATA_SOURCES)}.")


def eval_streams(
    cfg: DictConfig, teacher, tokenizer, held_out
) -> dict[str, tuple[Any, int, int | None]]:
    """Perplexity data set name → (token stream, window length, windows scored or None: all), per
    ``eval.datasets``; with ``eval.extra_seqlen`` = L, also ``<name>@L`` for WikiText-2 and C4:
    the same tokens as their long windows, scored in windows of L tokens."""
    from onebit.errors import OneBitInputError
    from onebit.eval.perplexity import c4_ids, wikitext2_ids

    e = cfg.eval
    ctx = getattr(teacher.config, "max_position_embeddings", None) or int(e.seqlen)
    seqlen = min(int(e.seqlen), int(ctx))
    cap = int(e.max_windows) if e.max_windows is not None else None
    extra = e.get("extra_seqlen")
    if extra is not None and (not isinstance(extra, int) or not 2 <= extra < seqlen):
        raise OneBitInputError(
            f"eval.extra_seqlen={extra!r} must be an integer from 2 to {seqlen - 1} (the windows "
            "of eval.seqlen are scored anyway) or null."
        )
    out, short = {}, {}
    for name in e.datasets:
        if name in ("wikitext2", "c4"):
            if name == "wikitext2":
                ids = wikitext2_ids(tokenizer, e.wikitext2_path)
            else:
                ids = c4_ids(tokenizer, e.c4_path, seqlen, cap if cap is not None else 256)
            out[name] = (ids, seqlen, cap)
            if extra:
                span = ids if cap is None else ids[: cap * seqlen]
                short[f"{name}@{extra}"] = (span[: span.numel() // seqlen * seqlen], extra, None)
        elif name == "generated":
            if held_out is None or len(held_out) == 0:
                raise OneBitInputError(
                    "eval.datasets has 'generated', which needs data.source=self_generated "
                    "and data.val_sequences > 0."
                )
            out[name] = (held_out.reshape(-1), held_out.shape[1], cap)
        else:
            raise OneBitInputError(f"eval.datasets has {name!r}; valid: wikitext2, c4, generated.")
    if not out:
        raise OneBitInputError("eval.datasets is empty; name at least one perplexity data set.")
    return {**out, **short}


# -- evaluation -----------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_signs(model) -> Iterator[None]:
    """Evaluate OneBitLinear layers with their ±1 signs computed once, not at every forward.

    The training layer recomputes ``sign(W)`` (a weight-sized tensor) at each call, which dominates
    the many small forwards of zero-shot scoring. Inside this context each layer runs
    ``onebit_forward`` (the same ops as its own forward) on signs computed on entry: the outputs
    are identical, bit for bit. Only for inference: the weights must not change meanwhile.
    """
    from onebit.quant import OneBitLinear, onebit_forward
    from onebit.quant.linear import add_skips

    layers = [m for m in model.modules() if isinstance(m, OneBitLinear)]
    for m in layers:
        signs = m.signs().to(m.weight.dtype)  # (out, in) ±1

        def forward(x, m=m, signs=signs):
            c = m.config
            y = onebit_forward(
                x, signs.to(x.dtype), m.in_scale, m.out_scale, c.output_norm, c.norm_eps,
                m.out_gain,
            )  # fmt: skip
            return add_skips(m, y, x)

        m.forward = forward
    try:
        yield
    finally:
        for m in layers:
            del m.forward  # back to the class's forward


def curve_ppl(model, streams, windows: int) -> float:
    """Perplexity on the first ``windows`` windows of the first data set (the curve's metric)."""
    from onebit.eval.perplexity import perplexity

    ids, seqlen, _ = next(iter(streams.values()))
    was = model.training
    with frozen_signs(model):
        ppl = perplexity(model.eval(), ids, seqlen, max_windows=windows).ppl
    model.train(was)
    return ppl


def evaluate_row(model, tokenizer, streams, cfg: DictConfig, zero_shot: bool) -> dict[str, Any]:
    """Perplexity on every stream and, when asked, zero-shot accuracy; with the time it took."""
    t0 = time.perf_counter()
    with frozen_signs(model.eval()):
        row = _evaluate(model, tokenizer, streams, cfg, zero_shot)
    row["eval_s"] = time.perf_counter() - t0
    return row


def _evaluate(model, tokenizer, streams, cfg: DictConfig, zero_shot: bool) -> dict[str, Any]:
    from onebit.eval.perplexity import perplexity, windows

    e = cfg.eval
    row: dict[str, Any] = {"ppl": {}, "zero_shot": {}}
    for i, (name, (ids, seqlen, cap)) in enumerate(streams.items()):
        # windows do not overlap, so the first stream is scored as the curve's windows plus the
        # rest, and the sums combine exactly: the curve metric comes at no extra cost
        n = len(windows(ids.numel(), seqlen))
        n = n if cap is None else min(n, cap)
        k = min(int(e.curve_windows), n) if i == 0 else 0
        bar = {"progress": True, "desc": f"{name} perplexity"}
        parts = [perplexity(model, ids[: k * seqlen], seqlen, **bar)] if k else []
        if n > k:
            parts.append(perplexity(model, ids[k * seqlen :], seqlen, max_windows=n - k, **bar))
        nll, count = sum(p.nll_sum for p in parts), sum(p.n_tokens for p in parts)
        row["ppl"][name] = {
            "ppl": math.exp(nll / count),
            "nll_sum": nll,
            "n_tokens": count,
            "n_windows": n,
            "seqlen": seqlen,
        }
        if i == 0:
            row["curve_ppl"] = parts[0].ppl
    if zero_shot and e.tasks:
        from onebit.eval.zeroshot import PAPER_METRIC
        from onebit.eval.zeroshot import zero_shot as run_zero_shot

        scores = run_zero_shot(
            model,
            tokenizer,
            tuple(e.tasks),
            e.zero_shot_data_dir,
            limit=e.limit,
            batch_size=int(e.batch_size),
        )
        for task, s in scores.items():
            row["zero_shot"][task] = {**s, "paper_metric": PAPER_METRIC[task]}
    return row


# -- distillation ---------------------------------------------------------------------------------
def distill(
    module,
    blocks,
    steps: int,
    batch_size: int,
    seed: int,
    grad_clip: float | None = 1.0,
    eval_every: int = 0,
    on_eval: Callable[[], float] | None = None,
    root_dir: str | None = None,
    long_steps: tuple[Any, int, int] | None = None,
) -> dict[str, Any]:
    """Train ``module`` (a ``OneBitDistillation`` whose ``configure_model`` has run) for ``steps``
    steps with a Lightning ``Trainer``: the ``training_step``, guards, optimizer and schedule that
    ``python train.py`` runs. Batches walk through ``blocks`` in a seeded order, reshuffled at each
    pass; the block-wise stage (``module.blockwise``) reads the first ``blockwise.sequences``.
    ``long_steps`` = (blocks, batch size, m): m more steps drawn alike from those blocks (longer
    sequences), spread evenly among the ``steps`` (step ``floor((i + 1/2) (steps + m) / m)`` is
    the i-th); the schedule spans all ``steps + m``.

    Returns ``{"curve": [{step, tokens, train_s, ppl, loss}], "steps", "tokens", "train_s"}``: a
    curve point before the first step (after the block-wise stage) and every ``eval_every`` steps
    (and at the end) with ``on_eval()``; ``train_s`` counts the training steps only (not the
    curve, not Lightning's set-up).

    Shapes: blocks (n, seq_len) token ids.
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator().manual_seed(seed)

    def draw(source, size: int, n: int) -> list[dict[str, Any]]:
        order: list[int] = []
        out = []
        for _ in range(n):
            while len(order) < size:
                order += torch.randperm(len(source), generator=gen).tolist()
            idx, order = order[:size], order[size:]
            out.append({"input_ids": source[idx]})  # (batch, seq_len)
        return out

    batches = draw(blocks, batch_size, steps)
    if long_steps:  # drawn after the row's own, so the row's own batches stay as without them
        short, long_ = iter(batches), iter(draw(*long_steps))
        steps += long_steps[2]
        at = {int((i + 0.5) * steps / long_steps[2]) for i in range(long_steps[2])}
        batches = [next(long_) if j in at else next(short) for j in range(steps)]

    class Blocks(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(batches, batch_size=None)  # each element is a batch

        seq_len = blocks.shape[1]

        def calibration_blocks(self, n: int, seq_len: int | None = None):
            return blocks[:n]  # the block-wise stage's: training blocks

    curve: list[dict[str, Any]] = []
    state: dict[str, Any] = {"train_s": 0.0, "tokens": 0, "loss": None, "t0": 0.0}

    def point(step: int) -> None:
        if on_eval is not None:
            ppl = on_eval()
            curve.append({"step": step, "tokens": state["tokens"], "train_s": state["train_s"],
                          "ppl": ppl, "loss": state["loss"]})  # fmt: skip
            log.info("step %d, %d tokens, %.0f s: ppl %.4g", step, state["tokens"],
                     state["train_s"], ppl)  # fmt: skip

    class Curve(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            point(0)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            state["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            state["train_s"] += time.perf_counter() - state["t0"]
            state["tokens"] += batch["input_ids"].numel()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            state["loss"] = float(loss)
            step = trainer.global_step
            if step == steps or (eval_every and step % eval_every == 0):
                point(step)

    # Lightning's start-up lines (devices, tips, "max_steps reached") once per row add nothing here
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, gradient_clip_val=grad_clip or None, callbacks=[Curve()],
        default_root_dir=root_dir,
    )  # fmt: skip
    trainer.fit(module, datamodule=Blocks())
    module.student.eval()
    return {"curve": curve, "steps": steps, "tokens": state["tokens"], "train_s": state["train_s"]}


# -- tables, files, plot, W&B ---------------------------------------------------------------------
def markdown_table(rows: list[dict[str, Any]], datasets: list[str], tasks: list[str]) -> str:
    """The paper's layout: Method | perplexities | zero-shot accuracies in % | Avg."""
    head = ["Method", *(ppl_column(d) for d in datasets)]
    task_cols = [t for t in PAPER_COLUMNS if t in tasks]
    head += [PAPER_COLUMNS[t] for t in task_cols] + (["Avg."] if task_cols else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["label"].replace("|", "\\|")]
        cells += [_fmt_ppl(r["ppl"][d]["ppl"]) if d in r["ppl"] else "-" for d in datasets]
        scores = task_scores(r, task_cols)
        cells += ["-" if p is None else f"{100 * p:.1f}" for p in scores]
        accs = [100 * p for p in scores if p is not None]
        if task_cols:
            cells.append(f"{sum(accs) / len(accs):.1f}" if len(accs) == len(task_cols) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    """Per trained row: steps, tokens, training time, and student/teacher perplexity ratios."""
    teacher = next((r for r in rows if r["key"] == "teacher"), None)
    head = ["Method", "steps", "tokens", "train (s)", "eval (s)"]
    head += [f"{ppl_column(d)} / teacher" for d in datasets] if teacher else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        t = r.get("train") or {}
        cells = [r["label"].replace("|", "\\|"), str(t.get("steps", 0)), f"{t.get('tokens', 0):,}"]
        cells += [f"{t.get('train_s', 0):.0f}", f"{r['eval_s']:.0f}"]
        if teacher:
            cells += [f"{r['ppl'][d]['ppl'] / teacher['ppl'][d]['ppl']:.3g}" for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_scores(row: dict[str, Any], tasks: list[str]) -> list[float | None]:
    """Each task's paper metric for ``row`` (a fraction; acc or acc_norm as the paper reports the
    task), None where the row has no score for the task."""
    out = []
    for t in tasks:
        s = row["zero_shot"].get(t)
        out.append(None if s is None else s.get(s["paper_metric"]))
    return out


def zero_shot_average(row: dict[str, Any], tasks: list[str]) -> tuple[float, float] | None:
    """A row's zero-shot average over ``tasks`` (each task's paper metric, in %) and its standard
    error, ``sqrt(Σ p(1 − p)/(n − 1)) / T`` over the T tasks (lm-eval's per-task stderr); None
    when the row lacks a task."""
    scores = task_scores(row, tasks)
    if None in scores:
        return None
    ns = [row["zero_shot"][t].get("n") or 0 for t in tasks]
    if min(ns, default=0) < 2:
        return None
    var = sum(p * (1 - p) / (n - 1) for p, n in zip(scores, ns))
    return 100 * sum(scores) / len(scores), 100 * math.sqrt(var) / len(scores)


def zero_shot_margins(rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """For each trained row: its zero-shot average minus the best untrained 1-bit row's, in
    standard errors of the difference ``sqrt(se_a² + se_b²)`` (items taken as independent, which
    overstates the error when both rows answer the same items, so the test is conservative)."""
    if not tasks:
        return []
    avg = {r["key"]: zero_shot_average(r, tasks) for r in rows}
    base = [(avg[k], r) for r in rows if (k := r["key"]) in UNTRAINED_ONEBIT and avg[k]]
    if not base:
        return []
    (b, b_se), b_row = max(base, key=lambda x: x[0][0])
    lines = []
    for r in rows:
        if not r.get("train") or avg[r["key"]] is None:
            continue
        a, a_se = avg[r["key"]]
        se = math.hypot(a_se, b_se)
        lines.append(
            f"- zero-shot: {r['label']} averages {a:.1f} ± {a_se:.1f} against {b:.1f} ± "
            f"{b_se:.1f} for the best untrained 1-bit row ({b_row['label']}): {a - b:+.1f} points, "
            f"{(a - b) / se:+.1f} standard errors of the difference"
        )
    return lines


def _fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.2e}"


def write_files(out_dir: Path, result: dict[str, Any], table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    rows = result["rows"]
    datasets, tasks = result["settings"]["datasets"], result["settings"]["tasks"]
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "key",
                "label",
                *(f"ppl_{d}" for d in datasets),
                *(f"acc_{t}" for t in tasks),
                *("steps", "tokens", "train_s", "eval_s"),
            ]
        )
        for r in rows:
            t = r.get("train") or {}
            accs = ["" if p is None else p for p in task_scores(r, tasks)]
            w.writerow(
                [
                    r["key"],
                    r["label"],
                    *(r["ppl"][d]["ppl"] for d in datasets),
                    *accs,
                    *(t.get("steps", 0), t.get("tokens", 0), t.get("train_s", 0), r["eval_s"]),
                ]
            )
    with (out_dir / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "step", "tokens", "train_s", "ppl", "loss"])
        for r in rows:
            for p in (r.get("train") or {}).get("curve", []):
                w.writerow([r["key"], p["step"], p["tokens"], p["train_s"], p["ppl"], p["loss"]])


def plot_curves(result: dict[str, Any], path: str | Path) -> Path | None:
    """Perplexity vs training tokens of the trained rows; untrained rows as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plot skipped: matplotlib is not installed (pip install matplotlib).")
        return None
    s = result["settings"]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    baseline_colors = {"teacher": "black", "xnor": "tab:red", "svid": "tab:purple"}
    ablation_colors = iter(
        ["tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "gold"] * 3
    )
    for r in result["rows"]:
        curve = (r.get("train") or {}).get("curve")
        if curve:
            main = r["key"] == "onebit"
            ax.plot(
                [p["tokens"] for p in curve],
                [p["ppl"] for p in curve],
                marker="o" if main else ".",
                lw=2.5 if main else 1.2,
                color="tab:blue" if main else next(ablation_colors),
                label=r["label"],
                zorder=3 if main else 2,
            )
        else:
            ax.axhline(
                r["curve_ppl"],
                ls="-" if r["key"] == "teacher" else "--",
                color=baseline_colors.get(r["key"], "tab:gray"),
                lw=1.2,
                label=r["label"],
            )
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ds = s["datasets"][0]
    ax.set_ylabel(f"{ppl_column(ds)} perplexity ({s['curve_tokens']:,} tokens, log)")
    ax.set_title(f"OneBit on {s['model']}: perplexity during distillation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


class WandbLog:
    """One W&B run for the whole table: each row's curve on its own token axis, then the table."""

    def __init__(self, cfg: DictConfig) -> None:
        node = container(cfg.get("logger")) or {}
        self.run = None
        if "wandb" not in node:
            return
        import wandb

        from onebit.train.loggers import resolve_wandb_mode

        w = node["wandb"]
        os.environ.setdefault("WANDB_SILENT", "true")
        Path(w.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=w.get("project", "onebit"),
            name=w.get("name"),
            dir=w.get("save_dir"),
            mode=resolve_wandb_mode(w.get("mode", "auto")),
            job_type="results",
            config=container(cfg),
        )

    def curve(self, key: str, curve: list[dict[str, float]]) -> None:
        if self.run is None:
            return
        self.run.define_metric(f"{key}/tokens")
        self.run.define_metric(f"{key}/*", step_metric=f"{key}/tokens")
        for p in curve:
            self.run.log({f"{key}/{k}": v for k, v in p.items()})

    def finish(self, result: dict[str, Any], plot: Path | None) -> str | None:
        if self.run is None:
            return None
        import wandb

        s = result["settings"]
        cols = ["key", "label", *(f"ppl_{d}" for d in s["datasets"])]
        data = [
            [r["key"], r["label"], *(r["ppl"][d]["ppl"] for d in s["datasets"])]
            for r in result["rows"]
        ]
        log_items: dict[str, Any] = {"results/table": wandb.Table(columns=cols, data=data)}
        if plot is not None:
            log_items["results/plot"] = wandb.Image(str(plot))
        self.run.log(log_items)
        self.run.summary.update({"rows": result["rows"]})
        where = str(Path(self.run.dir).parent)
        self.run.finish()
        return where


# -- finished rows: written as they finish, reused by a later run --------------------------------
def row_settings(cfg: DictConfig, key: str) -> dict[str, Any]:
    """What row ``key``'s numbers depend on: the model, data, evaluation and seed; the layer for
    the SVID rows; for a trained row also the whole recipe and its own overrides (an ablation's
    with its ``base`` resolved: a row whose base changed runs again). JSON-ready."""
    c = container(cfg)
    out = {k: c.get(k) for k in ("model", "data", "eval", "seed")}
    if key in ("svid", "svid_no_ln"):
        out["quant"] = c.get("quant")
    elif key not in ("teacher", "xnor"):
        out.update({k: c.get(k) for k in ("quant", "loss", "optim", "train", "blockwise")})
        ablations = c.get("ablations") or {}
        if key == "onebit":
            out["row"] = main_spec(cfg)
        else:
            out["row"] = ablation_spec(ablations, key) if key in ablations else None
    return json.loads(json.dumps(out, default=str))


# Settings keys added after rows were first saved, each with the value that reproduces what the
# code did before it existed: a saved row without the key matches a run that has that value.
ADDED_SETTINGS = {"loss.attention_weight": 0.0}


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """The dotted keys at which the settings a row was saved with and this run's differ (a key
    of ``ADDED_SETTINGS`` missing from ``saved`` counts as its value there)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            sub = f"{where}.{k}" if where else str(k)
            if k in saved and k in now:
                out += _differences(saved[k], now[k], sub)
            elif k in now and sub in ADDED_SETTINGS:
                out += [] if now[k] == ADDED_SETTINGS[sub] else [sub]
            else:
                out.append(sub)
        return out
    return [] if saved == now else [where or "(all)"]


def save_row(out_dir: Path, key: str, row: dict[str, Any], settings: dict[str, Any]) -> None:
    """``rows/<key>.json``: the row and the settings it was made with, written whole or not at
    all."""
    from onebit.fileio import atomic_write_text

    text = json.dumps({"settings": settings, "row": row}, indent=2)
    atomic_write_text(out_dir / "rows" / f"{key}.json", text)


def finished_rows(cfg: DictConfig, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Key → row, for each of ``keys`` that ``resume_dir`` finished with the settings this run
    has for it (:func:`row_settings`); a row made with other settings runs again (logged)."""
    from onebit.errors import OneBitInputError

    if not cfg.get("resume_dir"):
        return {}
    rows_dir = Path(str(cfg.resume_dir)).expanduser() / "rows"
    if not rows_dir.is_dir():
        raise OneBitInputError(
            f"resume_dir={cfg.resume_dir} has no rows/ folder; give the directory of an earlier "
            "run of this script (the one that holds its results.md or rows/)."
        )
    out = {}
    for key in keys:
        f = rows_dir / f"{key}.json"
        if not f.is_file():
            continue
        try:
            saved = json.loads(f.read_text())
            settings, row = saved["settings"], saved["row"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OneBitInputError(
                f"{f} is not a row file of this script ({type(e).__name__}: {e}); move it away "
                "to run that row again."
            ) from e
        diff = _differences(settings, row_settings(cfg, key))
        if diff:
            log.warning("%s was made with other settings (%s): the row runs again", f,
                        ", ".join(diff[:5]) + (", ..." if len(diff) > 5 else ""))  # fmt: skip
        else:
            out[key] = row
    return out


def export_row(cfg: DictConfig, key: str, student, quant, spec, tokenizer, row: dict) -> Path:
    """The trained student of row ``key``, packed, in ``students/<key>/``; its model card holds
    the row's perplexities."""
    from harness import command

    from onebit.config_utils import torch_dtype
    from onebit.export import save_onebit

    metrics = {f"{d} perplexity": v["ppl"] for d, v in row["ppl"].items()}
    return save_onebit(
        student,
        Path(cfg.paths.output_dir) / "students" / key,
        quant,
        torch_dtype("export_dtype", cfg.get("export_dtype", "float32")),
        tokenizer,
        extra={"model": spec.to_dict(), "results_row": key},
        card={"base": spec.name, "command": command(), "metrics": metrics},
    )


# -- the benchmark --------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Build, train and evaluate every row; write the files, the plot and the W&B run."""
    import torch

    from onebit.errors import OneBitInputError
    from onebit.heap import apply_warm_heap
    from onebit.models import ModelSpec, load_causal_lm, load_tokenizer
    from onebit.quant import OneBitConfig, footprint

    t_start = time.perf_counter()
    heap = apply_warm_heap(cfg.warm_heap)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    spec = ModelSpec.from_dict(container(cfg.model))
    quant = OneBitConfig.from_dict(container(cfg.quant))
    ablations = ablation_configs(cfg)  # validates quant, loss and optim of every arm
    main_arm(cfg)
    tr, e = cfg.train, cfg.eval
    keys = [*cfg.baselines, "onebit", *ablations]
    unknown = [k for k in cfg.baselines if k not in BASELINE_LABELS]
    if unknown:
        raise OneBitInputError(f"baselines has {unknown}; valid: {list(BASELINE_LABELS)}.")
    if cfg.rows is not None:
        missing = [k for k in cfg.rows if k not in keys]
        if missing:
            raise OneBitInputError(f"rows has {missing}; valid: {keys}.")
        keys = [k for k in keys if k in cfg.rows]

    teacher = load_causal_lm(spec).eval().requires_grad_(False)
    tokenizer = load_tokenizer(spec)
    blocks, held_out = load_data(cfg, spec, tokenizer)
    streams = eval_streams(cfg, teacher, tokenizer, held_out)
    first_ids, first_len, _ = next(iter(streams.values()))
    curve_tokens = min(int(e.curve_windows), first_ids.numel() // first_len) * (first_len - 1)
    settings = {
        "model": spec.name,
        "datasets": list(streams),  # eval.datasets, then their <name>@<eval.extra_seqlen>
        "tasks": list(e.tasks),
        "limit": e.limit,
        "zero_shot_ablations": bool(e.zero_shot_ablations),
        "curve_tokens": curve_tokens,
        "train_blocks": list(blocks.shape),
        "data_source": cfg.data.source,
        "threads": torch.get_num_threads(),
        "config": container(cfg),
    }
    log.info("training data: %d blocks of %d tokens", *blocks.shape)
    out_dir = Path(cfg.paths.output_dir)
    reused = finished_rows(cfg, keys)
    wb = WandbLog(cfg)
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any], note: str = "") -> None:
        rows.append(row)
        save_row(out_dir, row["key"], row, row_settings(cfg, row["key"]))
        if row["train"]:
            wb.curve(row["key"], row["train"]["curve"])
        ppl = ", ".join(f"{d} {v['ppl']:.4g}" for d, v in row["ppl"].items())
        print(f"[{time.perf_counter() - t_start:6.0f} s] {row['label']}: {ppl}{note}", flush=True)

    def add(
        key: str, label: str, model, zero_shot: bool, train: dict | None = None
    ) -> dict[str, Any]:
        row = {"key": key, "label": label, "train": train}
        what = "perplexity and zero-shot" if zero_shot and cfg.eval.tasks else "perplexity"
        log.info("%s: %s on %s", key, what, ", ".join(streams))
        row.update(evaluate_row(model, tokenizer, streams, cfg, zero_shot))
        keep(row)
        return row

    block_cache = {(str(cfg.data.source), int(cfg.data.seq_len)): blocks}

    def blocks_of(source: str, seq_len: int):
        """Training blocks of ``seq_len`` tokens from ``source``: C4 cut anew; generated text
        written (and cached) in sequences of data.seq_len tokens, joined for other lengths."""
        if (source, seq_len) not in block_cache:
            if source == "c4":
                block_cache[source, seq_len] = c4_train_blocks(
                    tokenizer, cfg.data.c4_path, seq_len, int(cfg.eval.seqlen)
                )
            else:
                base = int(cfg.data.seq_len)
                if (source, base) not in block_cache:
                    block_cache[source, base] = generated_blocks(cfg, spec, base)[0]
                flat = block_cache[source, base].reshape(-1)
                block_cache[source, seq_len] = flat[: flat.numel() // seq_len * seq_len].view(
                    -1, seq_len
                )
        return block_cache[source, seq_len]

    def trained(key: str, arm: Arm, steps: int, zero_shot: bool) -> None:
        import dataclasses

        from onebit.train.module import OneBitDistillation

        torch.manual_seed(int(cfg.seed))
        t0 = time.perf_counter()
        source = arm.source or str(cfg.data.source)
        data = blocks_of(source, arm.seq_len)
        # the teacher writing its text (when not cached) is part of the training budget
        generate_s = time.perf_counter() - t0 if source == "self_generated" else 0.0
        calib_data = data
        if arm.calibration_seq_len and arm.calibration_seq_len != arm.seq_len:
            calib_data = blocks_of(source, arm.calibration_seq_len)  # the same text, cut anew
        calib = calib_data[-arm.quant.calibration_sequences :]  # training text, never evaluated
        q = arm.quant  # quant.keep_massive: the module finds the kept layers on calib
        if arm.keep_massive:
            q = dataclasses.replace(q, keep_massive=arm.keep_massive)
        # the LightningModule train.py runs, on the loaded teacher: SVID (cached under
        # svid_cache_dir), calibration, then the block-wise stage and the steps in fit
        module = OneBitDistillation(
            spec, q, arm.loss, arm.optim, teacher=teacher, blockwise=arm.blockwise,
            svid_cache_dir=cfg.get("svid_cache_dir"),
        )  # fmt: skip
        module.calibration_ids = calib if q.needs_calibration else None
        module.blockwise_seed = int(cfg.seed)
        module.configure_model()
        student = module.student
        long_steps = None
        if arm.long_steps is not None:  # the same text cut into longer sequences
            ls = arm.long_steps
            long_steps = (blocks_of(source, ls.seq_len), ls.batch_size, ls.steps)
        train = distill(
            module,
            data,
            steps,
            arm.batch_size,
            int(cfg.seed),
            tr.grad_clip,
            int(tr.eval_every),
            lambda: curve_ppl(student, streams, int(e.curve_windows)),
            str(cfg.paths.output_dir),
            long_steps,
        )
        blockwise = module.blockwise_result
        if blockwise is not None:
            log.info(
                "block-wise: relative error of the last block %.3f -> %.3f (%.0f s)",
                blockwise["blocks"][-1]["rel_err_before"], blockwise["blocks"][-1]["rel_err_after"],
                blockwise["seconds"],
            )  # fmt: skip
        # finding the kept layers, calibration and the block-wise stage are training time
        kept = module.kept_massive
        calib_s = module.setup_seconds["keep_massive"] + module.setup_seconds["calibrate"]
        calib_s += blockwise["seconds"] if blockwise is not None else 0.0
        calib_s = calib_s if (q.needs_calibration or blockwise) else 0.0
        train["train_s"] += calib_s + generate_s  # so are calibration and written text
        train["calibrate_s"] = calib_s
        train["generate_s"] = generate_s
        train["kept_layers"] = kept
        train["blockwise"] = blockwise
        row_bits = footprint(student, module.quant)  # the kept layers by name
        train["bits_per_weight"] = row_bits.bits_per_weight
        train["model_bits_per_weight"] = row_bits.model_bits_per_weight
        row = add(key, arm.label, student, zero_shot, train)
        if cfg.get("save_students", False):
            path = export_row(cfg, key, student, module.quant, spec, tokenizer, row)
            log.info("%s: the student is exported to %s", key, path)

    for key in keys:
        if key in reused:
            keep(reused[key], f" (finished by {cfg.resume_dir})")
        elif key == "teacher":
            add(key, f"{spec.name} {BASELINE_LABELS[key]}", teacher, True)
        elif key == "xnor":
            add(key, BASELINE_LABELS[key], xnor_student(teacher), True)
        elif key == "svid":
            add(key, BASELINE_LABELS[key], onebit_student(teacher, quant), True)
        elif key == "svid_no_ln":
            q = OneBitConfig.from_dict({**quant.to_dict(), "output_norm": False})
            add(key, BASELINE_LABELS[key], onebit_student(teacher, q), True)
        elif key == "onebit":
            arm = main_arm(cfg)
            trained(key, arm, arm.steps or int(tr.steps), True)
        else:
            arm = ablations[key]
            trained(key, arm, arm.steps or int(tr.ablation_steps), bool(e.zero_shot_ablations))

    settings["total_s"] = time.perf_counter() - t_start
    settings["reused_rows"] = [k for k in keys if k in reused]
    result = {"settings": settings, "rows": rows}
    table = markdown_table(rows, settings["datasets"], settings["tasks"])
    budget = budget_table(rows, settings["datasets"])
    notes = _notes(result, streams)
    margins = "\n".join(zero_shot_margins(rows, settings["tasks"]))
    notes = f"{margins}\n\n{notes}" if margins else notes
    head = "\n".join(
        header("OneBit results: the teacher, untrained 1-bit rows, trained students", heap)
    )
    write_files(out_dir, result, f"{head}\n\n{table}\n\n{budget}\n\n{notes}")
    plot = plot_curves(result, cfg.plot) if cfg.plot else None
    result["wandb_dir"] = wb.finish(result, plot)
    print(f"\n{table}\n\n{budget}\n\n{notes}\n", flush=True)
    print(f"results: {out_dir}" + (f"\nplot: {plot}" if plot else ""), flush=True)
    if result["wandb_dir"]:
        print(f"W&B run: {result['wandb_dir']}", flush=True)
    return result


def _notes(result: dict[str, Any], streams: dict[str, tuple[Any, int, int | None]]) -> str:
    s, rows = result["settings"], result["rows"]
    parts = []
    for r in rows[:1]:
        for d, v in r["ppl"].items():
            parts.append(
                f"{d}: {v['n_windows']} windows of {v['seqlen']} tokens, {v['n_tokens']:,} scored"
            )
    if s["tasks"]:
        n = next((v.get("n") for r in rows for v in r["zero_shot"].values()), None)
        parts.append(f"zero-shot: first {n} items per task (limit {s['limit']})")
    parts.append(f"curves: {s['curve_tokens']:,} tokens of {s['datasets'][0]}")
    parts.append(
        f"training data: {s['data_source']}, {s['train_blocks'][0]} blocks × "
        f"{s['train_blocks'][1]} tokens"
    )
    parts.append(f"{s['threads']} threads, total {s['total_s']:.0f} s")
    return "; ".join(parts) + "."


register_resolvers()  # ${onebit.cwd:} in conf/paths, before Hydra composes


@hydra.main(config_path="../conf", config_name="results", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli

    run_cli(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
