"""The evaluation table in the OneBit paper's layout: perplexity (lower is better; WikiText-2 and
C4, then PTB and your own text when evaluated), then zero-shot accuracy in % with each task's paper
metric, then the average.

A row is the dict ``evaluate.py`` writes as ``eval.json``: ``model``, ``seqlen``, per data set
``{"ppl", "n_windows", "n_tokens", ...}`` and per task ``{"n", "acc", "acc_norm", ...,
"paper_metric"}``.
"""

from __future__ import annotations

from typing import Any

from onebit.eval.zeroshot import PAPER_COLUMNS

PPL_COLUMNS = {"wikitext2": "Wiki2", "c4": "C4", "ptb": "PTB", "text": "Text"}
TABLE_HEAD = ["Model", "Wiki2", "C4", *PAPER_COLUMNS.values(), "Avg."]


def _datasets(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's two perplexity columns, then PTB and your own text where a row has them."""
    return ["wikitext2", "c4"] + [d for d in ("ptb", "text") if any(d in r for r in rows)]


def table_head(rows: list[dict[str, Any]]) -> list[str]:
    """:data:`TABLE_HEAD`, with PTB and Text columns after C4 when ``rows`` have them."""
    return ["Model", *(PPL_COLUMNS[d] for d in _datasets(rows)), *PAPER_COLUMNS.values(), "Avg."]


def row_cells(row: dict[str, Any], datasets: list[str] | None = None) -> list[str]:
    """The cells of ``row`` under :func:`table_head` (``-`` where a column was not run; the
    average only when every task was)."""
    cells = [str(row["model"])]
    for ds in datasets or _datasets([row]):
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
    head, datasets = table_head(rows), _datasets(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row_cells(r, datasets)) + " |" for r in rows]
    return "\n".join(lines)


def table_notes(row: dict[str, Any]) -> str:
    """One line under the table: the window length, windows and tokens per data set, items and
    metric per task."""
    parts = [f"perplexity: seqlen {row['seqlen']}"]
    for ds in PPL_COLUMNS:
        if ds in row:
            parts.append(f"{ds} {row[ds]['n_windows']} windows / {row[ds]['n_tokens']:,} tokens")
    ns = {t: row[t]["n"] for t in PAPER_COLUMNS if t in row}
    if ns:
        metric = {t: row[t]["paper_metric"] for t in ns}
        parts.append(
            "zero-shot items: " + ", ".join(f"{t} {n} ({metric[t]})" for t, n in ns.items())
        )
    return "; ".join(parts)
