"""Perplexity on any text: your own file (txt, jsonl, parquet; a document per line, per paragraph
or one stream) and GPTQ's PTB protocol from a local file, scored as WikiText-2 and C4 are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onebit.errors import OneBitInputError
from onebit.eval.perplexity import local_text, perplexity, ptb_text

from ..conftest import REPO

TEXT = "First line of a story.\n\nSecond, after a blank line.\nThird, right below.\n"


def _write(tmp_path: Path, name: str, text: str = TEXT) -> Path:
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


@pytest.mark.parametrize(
    ("documents", "expected"),
    [
        ("row", "First line of a story.\n\nSecond, after a blank line.\n\nThird, right below."),
        ("paragraph", "First line of a story.\n\nSecond, after a blank line.\nThird, right below."),
        ("stream", TEXT.rstrip("\n")),
    ],
)
def test_a_text_file_becomes_one_stream(tmp_path, documents: str, expected: str) -> None:
    assert local_text(_write(tmp_path, "a.txt"), documents=documents) == expected


def test_jsonl_and_parquet_give_their_column_joined(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ["one doc", "", "two docs"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    pq.write_table(pa.table({"body": rows}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        assert local_text(tmp_path / name, text_field="body") == "one doc\n\ntwo docs"
    # a folder: its files in sorted order
    assert local_text(tmp_path, text_field="body") == "one doc\n\ntwo docs\n\none doc\n\ntwo docs"


def test_bad_text_sources_are_one_sentence(tmp_path) -> None:
    with pytest.raises(OneBitInputError, match=r"^eval.text_path='.*nope.txt' matches no file\.$"):
        local_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\n")
    with pytest.raises(OneBitInputError, match=r"is not UTF-8 text: byte 5 \(0xff\)"):
        local_text(bad)
    with pytest.raises(OneBitInputError, match=r"eval\.text_documents='lines' is not one of"):
        local_text(_write(tmp_path, "a.txt"), documents="lines")
    with pytest.raises(OneBitInputError, match="holds no text"):
        local_text(_write(tmp_path, "empty.txt", "\n\n"))


def test_ptb_from_a_local_file_joins_its_sentences_with_spaces(tmp_path) -> None:
    f = _write(
        tmp_path, "ptb.test.txt", " no it was n't black monday \n but while the new york\n\n"
    )
    assert ptb_text(f) == "no it was n't black monday but while the new york"


def test_evaluate_py_on_a_text_file_equals_the_library_on_the_same_tokens(
    tmp_path, stories_path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    story = " ".join(f"Tim saw a big dog number {i} and he was happy." for i in range(60))
    f = _write(tmp_path, "mine.txt", story + "\n\n" + story.upper() + "\n")
    out = subprocess.run(
        [
            sys.executable, "evaluate.py", "model=stories260k", f"model.path={stories_path}",
            "eval.datasets=[text]", f"eval.text_path={f}", "eval.tasks=[]", "eval.seqlen=64",
            "logger=none", f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads((tmp_path / "out" / "eval.json").read_text())
    # independently: the two lines joined as WikiText is, tokenised once, 64-token windows
    tok = AutoTokenizer.from_pretrained(stories_path)
    ids = torch.tensor(tok(story + "\n\n" + story.upper())["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    expected = perplexity(model, ids, 64)
    assert row["text"]["n_tokens"] == expected.n_tokens and row["text"]["n_windows"] > 3
    assert row["text"]["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert "| Model | Wiki2 | C4 | Text |" in out.stdout
    assert f"| {expected.ppl:.2f} |" in out.stdout
    assert f"text {expected.n_windows} windows / {expected.n_tokens:,} tokens" in out.stdout


def test_evaluate_py_names_a_missing_text_path(tmp_path, stories_path) -> None:
    out = subprocess.run(
        [sys.executable, "evaluate.py", "model=stories260k", f"model.path={stories_path}",
         "eval.datasets=[text]", "eval.tasks=[]", "logger=none", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: eval.datasets has text but eval.text_path is not set: give a file, folder or "
        "glob of .txt/.jsonl/.parquet."
    )
