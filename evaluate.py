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
from onebit.eval.table import markdown_table, table_notes

log = logging.getLogger("onebit.evaluate")


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


TEXT_SOURCE_KEYS = ("wikitext2_path", "c4_path", "c4_samples", "ptb_path", "text_path")
TEXT_SOURCE_KEYS += ("text_field", "text_documents")


def text_sources(e: DictConfig) -> dict[str, Any]:
    """The ``eval.*`` keys that say where each data set's text is (``eval_ids``' own defaults for
    any the config lacks)."""
    return {k: e[k] for k in TEXT_SOURCE_KEYS if k in e}


def run(cfg: DictConfig) -> dict[str, Any]:
    import torch

    from onebit.errors import OneBitInputError
    from onebit.eval.perplexity import eval_ids, perplexity

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
        ids = eval_ids(ds, tok, seqlen, **text_sources(e))
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
    print(table_notes(row), flush=True)
    print(f"results: {out_dir / 'eval.json'} and {out_dir / 'eval.md'}", flush=True)
    wandb_node = (OmegaConf.to_container(cfg.get("logger"), resolve=True) or {}).get("wandb")
    if wandb_node:
        from onebit.train.loggers import log_eval_table

        log_eval_table(wandb_node, OmegaConf.to_container(cfg, resolve=True), row)
    return row


def run_diagnose(cfg: DictConfig, model, tok, device) -> dict[str, Any]:
    """Print and write ``onebit.diagnostics`` for a 1-bit model against its teacher on the first
    ``diagnose.tokens`` tokens of the calibration text; for ``source=hf``, the model's own output
    scales and the layers a LayerNorm'd 1-bit layer could not write."""
    import torch

    from onebit.diagnostics import diagnose, keep_advice
    from onebit.errors import OneBitInputError
    from onebit.eval.perplexity import eval_ids
    from onebit.fileio import atomic_write_text
    from onebit.models import ModelSpec, load_causal_lm

    d = cfg.diagnose
    n, seq = int(d.tokens), int(d.seq_len)
    if n < seq or seq < 2:
        raise OneBitInputError(f"diagnose.tokens={n} must be at least diagnose.seq_len={seq} >= 2.")
    sources = {**text_sources(cfg.eval), "c4_samples": -(-n // seq)}
    ids = eval_ids(d.text, tok, seq, **sources, key="diagnose.text")
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
    over, ranked, advice = keep_advice(report, int(d.keep))
    text = report.format(top=int(d.top)) + "\n\n" + advice
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**report.to_dict(), "massive_layers": over, "keep": ranked, "text": d.text}
    result["seq_len"] = seq
    atomic_write_text(out_dir / "diagnostics.json", json.dumps(result, indent=2))
    print("\n" + text + "\n", flush=True)
    print(f"diagnostics: {out_dir / 'diagnostics.json'}", flush=True)
    return result


register_resolvers()  # ${onebit.cwd:} in conf/paths, before Hydra composes


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli

    run_cli(run, cfg)


if __name__ == "__main__":
    from onebit.train.preflight import exit_on_bad_command_line

    exit_on_bad_command_line(Path(__file__).resolve().parent / "conf", config_name="evaluate")
    main()
