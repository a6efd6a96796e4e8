"""Perplexity by the GPTQ/OmniQuant protocol, as the OneBit paper reports it.

WikiText-2: the raw *test* split joined with ``"\\n\\n"``, tokenised once, cut into non-overlapping
windows of ``seqlen`` tokens (the tail that does not fill a window is dropped). C4: 256 windows of
``seqlen`` tokens sampled from the validation documents with ``random.seed(0)`` — a random document
longer than ``seqlen`` tokens, then a random window inside it — as GPTQ's ``get_c4`` does.

Within each window every token but the first is predicted; perplexity is
``exp(Σ NLL / number of predicted tokens)``. (GPTQ multiplies each window's mean loss by ``seqlen``
and divides by ``windows · seqlen``, which is the same number.) ``stride < seqlen`` gives the
sliding-window evaluation instead: windows start every ``stride`` tokens and score only the tokens
that the previous window did not. Under ``torch.distributed`` the windows are split over ranks and
the sums — not the means — are reduced.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from onebit.dist import dist_rank_world
from onebit.distill.losses import next_token_nll
from onebit.errors import OneBitInputError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict[str, float]:
        return {
            "ppl": self.ppl,
            "nll_sum": self.nll_sum,
            "n_tokens": self.n_tokens,
            "n_windows": self.n_windows,
        }


def windows(n_tokens: int, seqlen: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each evaluation window over ``n_tokens`` tokens.

    Non-overlapping by default; with ``stride`` the windows overlap and each scores only the tokens
    after the previous window's end (a window's first token is never scored: nothing predicts it).
    """
    if seqlen < 2:
        raise OneBitInputError(f"eval.seqlen={seqlen} must be at least 2.")
    if stride is None or stride >= seqlen:
        return [(b, b + seqlen, b + 1) for b in range(0, n_tokens - seqlen + 1, seqlen)]
    if stride < 1:
        raise OneBitInputError(f"eval.stride={stride} must be >= 1.")
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seqlen, n_tokens)
        out.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: Tensor,
    seqlen: int,
    stride: int | None = None,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of a causal LM on one token stream, window by window.

    Args:
        model: a causal LM returning ``.logits`` (Hugging Face style) or logits directly.
        input_ids: the tokenised evaluation text.
        seqlen: window length (the paper: 2048, capped by the model's context).
        stride: sliding-window step; ``None`` for non-overlapping windows.
        max_windows: evaluate only the first windows (quick runs on CPU; report the token count).
        device: where to run (default: the model's).
        progress: show a progress bar, named ``desc``.

    Shapes: input_ids (n_tokens,) or (1, n_tokens).
    """
    ids = input_ids.reshape(-1)
    spans = windows(ids.numel(), seqlen, stride)
    if max_windows is not None:
        spans = spans[:max_windows]
    if not spans:
        raise OneBitInputError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}."
        )
    rank, world = dist_rank_world()
    device = device or next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    mine = spans[rank::world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=desc, unit="window")
    for begin, end, first in mine:
        window = ids[begin:end].unsqueeze(0).to(device)  # (1, T)
        out = model(window)
        logits = out.logits if hasattr(out, "logits") else out  # (1, T, V)
        losses = next_token_nll(logits, window)[0][0]  # [k]: the NLL of token begin + k + 1
        scored = losses[first - begin - 1 :]
        nll += scored.double().sum()
        count += scored.numel()
    if world > 1:
        torch.distributed.all_reduce(nll)
        torch.distributed.all_reduce(count)
    return PerplexityResult(
        math.exp(nll.item() / count.item()), nll.item(), int(count.item()), len(spans)
    )


def wikitext2_text(path: str | Path | None = None) -> str:
    """The WikiText-2 raw test split as one string, rows joined with ``"\\n\\n"``.

    Args:
        path: a local ``wiki.test.raw`` (CRLF normalised; a copy whose blank lines were dropped
            gives an approximation of the canonical join), or ``None`` for the Hub's
            ``wikitext-2-raw-v1``.
    """
    if path is None:
        rows = _hub_rows("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
        return "\n\n".join(rows)
    p = Path(path).expanduser()
    if not p.is_file():
        raise OneBitInputError(f"eval.wikitext2_path={path} is not a file.")
    text = p.read_text(encoding="utf-8").replace("\r\n", "\n")
    # The Hub's rows are the raw file's lines, each ending in "\n", with an empty row for each
    # blank line. A copy without its blank lines is rebuilt as: empty row, line, empty row, ...
    rows: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            rows += ["", line + "\n"]
    return "\n\n".join(rows)


def wikitext2_ids(tokenizer, path: str | Path | None = None) -> Tensor:
    """Token ids of the joined WikiText-2 test text, tokenised once. Shapes: → (n_tokens,)."""
    return _encode(tokenizer, wikitext2_text(path))


def c4_ids(
    tokenizer,
    path: str | Path | None = None,
    seqlen: int = 2048,
    n_samples: int = 256,
    seed: int = 0,
) -> Tensor:
    """GPTQ's C4 evaluation stream: ``n_samples`` random ``seqlen`` windows, concatenated.

    Args:
        path: a local parquet/jsonl of C4 validation documents (field ``text``), or ``None`` for the
            Hub's ``allenai/c4`` validation shard 0 (GPTQ's file).

    Shapes: → (n_samples * seqlen,).
    """
    docs = _c4_docs(path)
    rng = random.Random(seed)
    cache: dict[int, Tensor] = {}
    long_enough = 0
    out = []
    for _ in range(n_samples):
        for _attempt in range(100 * len(docs)):
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = _encode(tokenizer, docs[i])
            if cache[i].numel() > seqlen:
                long_enough += 1
                break
        else:
            raise OneBitInputError(
                f"no C4 document in {path or 'allenai/c4'} is longer than {seqlen} tokens."
            )
        ids = cache[i]
        j = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[j : j + seqlen])
    return torch.cat(out)


def ptb_text(path: str | Path | None = None) -> str:
    """GPTQ's PTB test stream: the test sentences of Penn Treebank joined with spaces.

    Args:
        path: a local file of the sentences, one per line (``ptb.test.txt`` of Mikolov's
            ``simple-examples``: the Hub's ``ptb_text_only`` rows), or ``None`` for the Hub's
            ``ptb-text-only/ptb_text_only`` test split (needs internet).
    """
    if path is None:
        rows = _hub_rows("ptb-text-only/ptb_text_only", "penn_treebank", "test", column="sentence")
    else:
        from onebit.data.sources import check_utf8

        p = Path(path).expanduser()
        if not p.is_file():
            raise OneBitInputError(f"eval.ptb_path={path} is not a file.")
        check_utf8(p)
        rows = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    return " ".join(r for r in rows if r)


TEXT_DOCUMENTS = ("row", "paragraph", "stream")


def local_text(path: str | Path, text_field: str = "text", documents: str = "row") -> str:
    """Your own evaluation text: the documents of local files joined with ``"\n\n"`` (the
    WikiText join), tokenised once as one stream.

    Args:
        path: a ``.txt``/``.raw``, ``.jsonl`` or ``.parquet`` file (``.gz`` too, but parquet), a
            folder of them or a glob (in sorted order).
        text_field: the column of JSON lines and parquet rows.
        documents: ``row`` (each line or row is a document; blank ones dropped), ``paragraph``
            (lines separated by blank lines) or ``stream`` (each file is one text, as written).
    """
    from onebit.data.sources import (
        check_local_files,
        file_kind,
        group_rows,
        iter_file_rows,
        resolve_local_files,
    )

    if documents not in TEXT_DOCUMENTS:
        raise OneBitInputError(
            f"eval.text_documents={documents!r} is not one of {', '.join(TEXT_DOCUMENTS)}."
        )
    files = resolve_local_files(path, key="eval.text_path")
    check_local_files(files, text_field)  # UTF-8 and the column, naming the file and byte
    docs: list[str] = []
    for f in files:
        if documents == "stream" and file_kind(f) == "text":
            docs.append("\n".join(iter_file_rows(f, text_field)))
        else:
            mode = "row" if documents == "stream" else documents
            docs.extend(group_rows(iter_file_rows(f, text_field), mode))
    text = "\n\n".join(d for d in docs if d.strip())
    if not text:
        raise OneBitInputError(f"eval.text_path={path} holds no text.")
    return text


EVAL_DATASETS = ("wikitext2", "c4", "ptb", "text")


def eval_ids(
    name: str,
    tokenizer,
    seqlen: int,
    *,
    wikitext2_path: str | Path | None = None,
    c4_path: str | Path | None = None,
    c4_samples: int = 256,
    ptb_path: str | Path | None = None,
    text_path: str | Path | None = None,
    text_field: str = "text",
    text_documents: str = "row",
    key: str = "eval.datasets",
) -> Tensor:
    """The token stream of evaluation set ``name`` (:data:`EVAL_DATASETS`) under the GPTQ
    protocol: WikiText-2's whole test text, C4's ``c4_samples`` random windows of ``seqlen``, PTB's
    test sentences, or your own text (:func:`local_text`). An unknown name is one sentence naming
    ``key``. Shapes: → (n_tokens,)."""
    if name == "wikitext2":
        return wikitext2_ids(tokenizer, wikitext2_path)
    if name == "c4":
        return c4_ids(tokenizer, c4_path, seqlen=seqlen, n_samples=c4_samples)
    if name == "ptb":
        return _encode(tokenizer, ptb_text(ptb_path))
    if name == "text":
        if text_path is None:
            raise OneBitInputError(
                "eval.datasets has text but eval.text_path is not set: give a file, folder or "
                "glob of .txt/.jsonl/.parquet."
            )
        return _encode(tokenizer, local_text(text_path, text_field, text_documents))
    raise OneBitInputError(f"{key} has {name!r}; valid: {', '.join(EVAL_DATASETS)}.")


def _encode(tokenizer, text: str) -> Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _c4_docs(path: str | Path | None) -> list[str]:
    if path is None:
        rows = _hub_rows(
            "allenai/c4",
            None,
            "validation",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
        )
        return list(rows)
    p = Path(path).expanduser()
    if not p.is_file():
        raise OneBitInputError(f"eval.c4_path={path} is not a file.")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [t for t in pq.read_table(p, columns=["text"]).column("text").to_pylist() if t]
    import json

    with p.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _hub_rows(
    name: str, config: str | None, split: str, column: str = "text", **kwargs
) -> list[str]:
    from onebit.hub import hub_reachable

    if not hub_reachable():
        raise OneBitInputError(
            f"cannot download {name} for evaluation: the Hugging Face Hub is unreachable "
            f"(offline); give a local file instead (eval.wikitext2_path= / eval.c4_path= / "
            "eval.ptb_path=)."
        )
    import datasets

    ds = datasets.load_dataset(name, config, split=split, **kwargs)
    return list(ds[column])
