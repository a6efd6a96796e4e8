"""Fixtures of the data tests: the real stories260K tokenizer and small synthetic corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import shared_path

_ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bear", "lion", "duck"]
_NAMES = ["Tim", "Lily", "Sam", "Mia", "Ben", "Sue", "Max"]


def make_documents(n: int) -> list[str]:
    """``n`` distinct short stories of varied length (1 to 6 sentences)."""
    docs = []
    for i in range(n):
        animal, name = _ANIMALS[i % len(_ANIMALS)], _NAMES[i % len(_NAMES)]
        sentence = f"Once upon a time, {name} saw a {animal} number {i}. "
        docs.append((sentence * (1 + i % 6)).strip())
    return docs


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("models", "stories260K-hf"))


@pytest.fixture
def docs_jsonl(tmp_path: Path) -> tuple[Path, list[str]]:
    """A JSON-lines file of 40 documents, and the documents."""
    docs = make_documents(40)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs
