"""Evaluation callbacks in training: WikiText-2 perplexity at validation, zero-shot at the end."""

from __future__ import annotations

import csv
from pathlib import Path

from ..conftest import shared_path
from ..train.conftest import compose_train


def test_perplexity_and_zero_shot_are_logged(tmp_path, stories_path) -> None:
    import train

    wiki = shared_path("data", "wikitext2", "wiki.test.raw")
    cfg = compose_train(
        [
            "model=stories260k",
            f"model.path={stories_path}",
            "trainer=cpu_smoke",
            "logger=csv",
            "data.num_sequences=8",
            "data.val_sequences=2",
            "data.seq_len=32",
            "export=false",
            "callbacks=eval",
            f"callbacks.ppl_wikitext2.path={wiki}",
            "callbacks.ppl_wikitext2.max_windows=2",
            "callbacks.checkpoint.monitor=val/ppl_wikitext2",
            "callbacks.checkpoint.filename=best",
            "callbacks.zero_shot.tasks=[piqa,arc_easy]",
            f"callbacks.zero_shot.data_dir={shared_path('data')}",
            "callbacks.zero_shot.limit=4",
        ],
        tmp_path,
    )
    result = train.run(cfg)
    with open(next(Path(cfg.paths.output_dir).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    ppl = [float(r["val/ppl_wikitext2"]) for r in rows if r.get("val/ppl_wikitext2")]
    assert len(ppl) >= 2 and all(p > 1 for p in ppl)  # steps 2 and 4, then the final validation
    for key in ("test/acc_piqa", "test/acc_norm_piqa", "test/acc_arc_easy"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 1 and 0 <= values[0] <= 1, key
    assert Path(result["checkpoint_best"]).name == "best.ckpt"  # monitored val/ppl_wikitext2


def test_diagnostics_are_logged_at_every_validation(tmp_path) -> None:
    """The default callbacks log diag/* at the validation before training and after it; the
    first point is the SVID-initialised student (quant.sign_init=sign: no sign flipped yet)."""
    import train

    from ..train.conftest import TINY

    cfg = compose_train([*TINY, "export=false", "optim.lr=5e-2", "quant.sign_init=sign"], tmp_path)
    result = train.run(cfg)
    with open(next(Path(cfg.paths.output_dir).rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/flip_frac")]
    steps = [int(r["step"]) for r in rows]
    assert steps[0] == 0 and steps[-1] == 4 and len(steps) >= 3  # before, at step 2 and 4
    flips = [float(r["diag/flip_frac"]) for r in rows]
    assert flips[0] == 0.0 and flips[-1] > 0.0  # lr 5e-2 moves latents of 0.01 across zero
    for r in rows:  # tiny_llama has 2 decoder blocks
        errs = [float(r[k]) for k in r if k.startswith("diag/block_rel_err/") and r[k]]
        assert len(errs) == 2
        assert max(errs) == float(r["diag/block_rel_err_max"]) and min(errs) > 0
    d = result["diagnostics"]  # the summary train.py prints: first and last validation
    assert d["first"]["flip_frac"] == 0.0 and d["last"]["flip_frac"] == flips[-1]
