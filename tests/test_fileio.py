"""onebit.fileio: a file is replaced whole or not at all."""

from __future__ import annotations

import pytest

from onebit.checkpoint import remove_stale_temporaries
from onebit.fileio import atomic_path, atomic_write_text, temporary_name


def test_a_finished_write_replaces_the_file(tmp_path) -> None:
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two", durable=True)
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_temporary_left_by_a_killed_process_is_recognised(tmp_path) -> None:
    stale = temporary_name(tmp_path / "last.ckpt")
    stale.write_text("half")
    assert stale.name.startswith(".last.ckpt.tmp")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists()
