"""Evaluate a model as the OneBit paper does: WikiText-2 and C4 perplexity, zero-shot accuracy.

    python evaluate.py model=stories260k \
        'eval.wikitext2_path=${paths.shared_dir}/data/wikitext2/wiki.test.raw'
    python evaluate.py source=export path=outputs/train/runs/<time>/onebit_model eval.limit=100
    python evaluate.py source=checkpoint path=outputs/train/runs/<time>/checkpoints/last.ckpt
    python evaluate.py source=export path=... diagnose.enabled=true   # student against teacher

Prints a table in the paper's layout, writes it as JSON and Markdown to the run directory, and logs
it to W&B as a table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from onebit.config_utils import register_resolvers, torch_dtype
from onebit.eval.zeroshot import PAPER_COLUMNS

log = logging.getLogger("onebit.evaluate")

TABLE_HEAD = ["Model", "Wiki2", "C4", *PAPER_COLUMNS.values(), "Avg."]


def load_for_eval(cfg: DictConfig):
    """(model, tokenizer, row name) for ``cfg.source``: hf, checkpoint or export
    (``onebit.loading.load_model``)."""

    from onebit.errors import OneBitInputError
    from onebit.loading import load_model

    if cfg.source != "hf":  # load_model names a source that is none of hf, export, checkpoint
        chosen = [o for o in _overrides() if o.lstrip("+~").split("=")[0].split(".")[0] == "model"]
        if chosen:
            raise OneBitInputError(
                f"{chosen[0]} is not used with source={cfg.source}: the {cfg.source} names its "
                "own model; drop the override (or use source=hf to evaluate that model)."
            )
    loaded = load_model(
        cfg.source,
        path=cfg.path,
        model=OmegaConf.to_container(cfg.model, resolve=True) if cfg.source == "hf" else None,
        dtype=torch_dtype("dtype", cfg.dtype),
        prefill=cfg.get("prefill", "fp32"),
    )
    return loaded.model, loaded.tokenizer, loaded.name


def _overrides() -> list[str]:
    """The command line's overrides (empty outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from onebit.errors import OneBitInputError
    from onebit.eval.perplexity import c4_ids, perplexity, wikitext2_ids

    model, tok, name = load_for_eval(cfg)
    if tok is None:
        raise OneBitInputError(
            f"{cfg.path or cfg.model.name} has no tokenizer (a tiny random model, as smoke runs "
            "use, has none), so there is no text to evaluate it on; use a model with one."
        )
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    model.to(device).eval()
    if cfg.diagnose.enabled:
        return run_diagnose(cfg, model, tok, device)
    e = cfg.eval
    ctx = getattr(model.config, "max_position_embeddings", None) or e.seqlen
    seqlen = min(int(e.seqlen), int(ctx))
    row: dict[str, Any] = {"model": cfg.name or name, "seqlen": seqlen}
    for ds in e.datasets:
        if ds == "wikitext2":
            ids = wikitext2_ids(tok, e.wikitext2_path)
        elif ds == "c4":
            ids = c4_ids(tok, e.c4_path, seqlen=seqlen, n_samples=e.c4_samples)
        else:
            raise OneBitInputError(f"eval.datasets has {ds!r}; valid: wikitext2, c4.")
        res = perplexity(model, ids, seqlen, e.stride, e.max_windows, device, progress=True)
        row[ds] = res.to_dict()
    if e.tasks:
        from onebit.eval.zeroshot import PAPER_METRIC, zero_shot

        scores = zero_shot(
            model, tok, tuple(e.tasks), e.zero_shot_data_dir, limit=e.limit, batch_size=e.batch_size
        )
        for task, s in scores.items():
            row[task] = {**s, "paper_metric": PAPER_METRIC.get(task, "acc")}
    from onebit.fileio import atomic_write_text

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table([row])
    atomic_write_text(out_dir / "eval.json", json.dumps(row, indent=2))
    atomic_write_text(out_dir / "eval.md", table + "\n")
    print("\n" + table + "\n", flush=True)
    print(_notes(row), flush=True)
    print(f"results: {out_dir / 'eval.json'} and {out_dir / 'eval.md'}", flush=True)
    _log_wandb(cfg, row)
    return row


def run_diagnose(cfg: DictConfig, model, tok, device) -> dict[str, Any]:
    """Print and write ``onebit.diagnostics`` for a 1-bit model against its teacher on the first
    ``diagnose.tokens`` tokens of the calibration text; for ``source=hf``, the model's own output
    scales and the layers a LayerNorm'd 1-bit layer could not write."""
    import torch

    from onebit.diagnostics import diagnose, massive_layers
    from onebit.errors import OneBitInputError
    from onebit.eval.perplexity import c4_ids, wikitext2_ids
    from onebit.fileio import atomic_write_text
    from onebit.models import ModelSpec, load_causal_lm

    d = cfg.diagnose
    n, seq = int(d.tokens), int(d.seq_len)
    if n < seq or seq < 2:
        raise OneBitInputError(f"diagnose.tokens={n} must be at least diagnose.seq_len={seq} >= 2.")
    if d.text == "wikitext2":
        ids = wikitext2_ids(tok, cfg.eval.wikitext2_path)
    elif d.text == "c4":
        ids = c4_ids(tok, cfg.eval.c4_path, seqlen=seq, n_samples=-(-n // seq))
    else:
        raise OneBitInputError(f"diagnose.text={d.text!r} is not wikitext2 or c4.")
    if ids.numel() < seq:
        raise OneBitInputError(f"the diagnose.text={d.text} text has fewer than {seq} tokens.")
    ids = ids[: (min(n, ids.numel()) // seq) * seq].view(-1, seq).to(device)  # (batch, seq)
    if cfg.source == "hf":
        teacher, student = model, None
    else:
        teacher = load_causal_lm(ModelSpec.from_dict(model.config.onebit["model"]))
        teacher = teacher.to(device=device, dtype=next(model.parameters()).dtype).eval()
        student = model
    with torch.no_grad():
        report = diagnose(teacher, student, ids)
    over = massive_layers(report)
    text = report.format(top=int(d.top))
    text += (
        f"\n\n{len(over)} of {len(report.layers)} layers write entries above sqrt(out - 1), "
        "the most a OneBit layer with its output LayerNorm can"
    )
    ranked = sorted(over, key=lambda n: -_excess(report, n))[: int(d.keep)]
    if ranked:
        text += (
            f"; the {len(ranked)} furthest above it (max |y| / sqrt(out - 1)), to keep in full "
            f"precision:\n  quant.skip_modules=[{','.join(ranked)}]\n(or, at a fraction of the "
            "bits, keep only the weights that write them: quant.outliers=256, the default of "
            "quant=onebit)"
        )
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**report.to_dict(), "massive_layers": over, "keep": ranked, "text": d.text}
    result["seq_len"] = seq
    atomic_write_text(out_dir / "diagnostics.json", json.dumps(result, indent=2))
    print("\n" + text + "\n", flush=True)
    print(f"diagnostics: {out_dir / 'diagnostics.json'}", flush=True)
    return result


def _excess(report, name: str) -> float:
    r = next(layer for layer in report.layers if layer.name == name)
    return r.teacher.absmax / max(r.out_features - 1, 1) ** 0.5


def _cells(row: dict[str, Any]) -> list[str]:
    cells = [str(row["model"])]
    for ds in ("wikitext2", "c4"):
        cells.append(f"{row[ds]['ppl']:.2f}" if ds in row else "-")
    accs = []
    for task in PAPER_COLUMNS:
        s = row.get(task)
        value = s.get(s.get("paper_metric", "acc")) if s else None
        if value is None:
            cells.append("-")
        else:
            accs.append(100 * value)
            cells.append(f"{100 * value:.2f}")
    cells.append(f"{sum(accs) / len(accs):.2f}" if len(accs) == len(PAPER_COLUMNS) else "-")
    return cells


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The paper's layout: perplexity (lower is better), then zero-shot accuracy in %, average."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" + "---:|" * (len(TABLE_HEAD) - 1)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _notes(row: dict[str, Any]) -> str:
    parts = [f"perplexity: seqlen {row['seqlen']}"]
    for ds in ("wikitext2", "c4"):
        if ds in row:
            parts.append(f"{ds} {row[ds]['n_windows']} windows / {row[ds]['n_tokens']:,} tokens")
    ns = {t: row[t]["n"] for t in PAPER_COLUMNS if t in row}
    if ns:
        metric = {t: row[t]["paper_metric"] for t in ns}
        parts.append(
            "zero-shot items: " + ", ".join(f"{t} {n} ({metric[t]})" for t, n in ns.items())
        )
    return "; ".join(parts)


def _log_wandb(cfg: DictConfig, row: dict[str, Any]) -> None:
    node = OmegaConf.to_container(cfg.get("logger"), resolve=True) or {}
    if "wandb" not in node:
        return
    import wandb

    from onebit.train.loggers import resolve_wandb_mode

    w = node["wandb"]
    run = wandb.init(
        project=w.get("project", "onebit"),
        name=w.get("name"),
        dir=w.get("save_dir"),
        mode=resolve_wandb_mode(w.get("mode", "auto")),
        job_type="evaluate",
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    run.log({"eval/table": wandb.Table(columns=TABLE_HEAD, data=[_cells(row)])})
    run.summary.update({"eval": row})
    run.finish()


register_resolvers()  # ${onebit.cwd:} in conf/paths, before Hydra composes


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli

    run_cli(run, cfg)


if __name__ == "__main__":
    from onebit.train.preflight import exit_on_bad_command_line

    exit_on_bad_command_line(Path(__file__).resolve().parent / "conf", config_name="evaluate")
    main()
