"""Checkpoint files: atomic writes, a truncated or corrupt file is named and the previous good one
used, a full disk replaces nothing, and loading never runs pickled code."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

from onebit import checkpoint as ck
from onebit.checkpoint import single
from onebit.errors import OneBitInputError, OneBitRunError
from onebit.train.checkpoint_io import AtomicCheckpointIO


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "global_step": step,
        "epoch": 0,
        "state_dict": {"student.w": torch.randn(64, 64, generator=g)},
    }


def _write(directory: Path, step: int, name: str | None = None) -> Path:
    path = directory / (name or f"step{step:08d}.ckpt")
    ck.write_checkpoint(_state(step), path)
    return path


def test_write_leaves_the_file_and_a_matching_sidecar(tmp_path: Path) -> None:
    path = _write(tmp_path, 4)
    meta = single._read_sidecar(path)
    assert meta["size"] == path.stat().st_size and meta["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".meta.json"]
    result = ck.check_checkpoint(path)
    assert result.ok and result.verified and result.global_step == 4
    torch.testing.assert_close(
        ck.load_checkpoint_file(path)["state_dict"]["student.w"],
        _state(4)["state_dict"]["student.w"],
    )


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_used(
    tmp_path: Path, damage: str, caplog
) -> None:
    _write(tmp_path, 2)
    newest = _write(tmp_path, 4)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # torch.load would read this silently
    newest.write_bytes(bytes(data))

    found, bad = ck.find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step00000002.ckpt"
    assert [r.path for r in bad] == [newest]
    reason = "is truncated" if damage == "truncate" else "is corrupt (its CRC-32 differs"
    assert bad[0].reason.startswith(reason), bad[0].reason

    with caplog.at_level(logging.WARNING, logger="onebit.checkpoint"):
        assert ck.resolve_ckpt_path("auto", tmp_path) == found
        assert ck.resolve_ckpt_path(str(tmp_path), tmp_path / "elsewhere") == found
    assert "step00000004.ckpt " + reason in caplog.text

    with pytest.raises(OneBitInputError) as e:  # named explicitly: refused, the good one named
        ck.resolve_ckpt_path(str(newest), tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"ckpt_path={newest} {reason}")
    assert "step00000002.ckpt (step 2)" in msg and msg.endswith(".") and "\n" not in msg


def test_a_file_without_sidecar_is_opened_to_check_it(tmp_path: Path) -> None:
    # killed between the two renames: a complete file, its sidecar not yet in place
    complete = _write(tmp_path, 6)
    ck.sidecar_path(complete).unlink()
    (tmp_path / "step00000008.ckpt").write_bytes(b"not a zip file")
    found, bad = ck.find_resume_checkpoint(tmp_path)
    assert found == complete and ck.check_checkpoint(complete).verified is False
    assert bad[0].path.name == "step00000008.ckpt"
    assert bad[0].reason.startswith("cannot be read as a checkpoint")


def test_auto_without_checkpoints_starts_a_new_run(tmp_path: Path) -> None:
    assert ck.resolve_ckpt_path("auto", tmp_path / "checkpoints") is None
    assert ck.resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(OneBitInputError, match="holds no usable checkpoint"):
        ck.resolve_ckpt_path(str(tmp_path), tmp_path)
    with pytest.raises(OneBitInputError, match="does not exist"):
        ck.resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_disk_full_mid_write_replaces_nothing(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path, 2, "last.ckpt")
    before = path.read_bytes(), ck.sidecar_path(path).read_bytes()
    original = single._ChecksumWriter.write

    def full_after_4k(self, data):
        if self.size + len(data) > 4096:
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.error = e
            raise e
        return original(self, data)

    monkeypatch.setattr(single._ChecksumWriter, "write", full_after_4k)
    with pytest.raises(OneBitRunError) as e:
        ck.write_checkpoint(_state(4), path)
    msg = str(e.value)
    assert msg.startswith(f"could not write checkpoint {path} (the disk is full)")
    assert "the previous last.ckpt there is intact" in msg and "\n" not in msg
    assert (path.read_bytes(), ck.sidecar_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.meta.json"]
    assert ck.check_checkpoint(path).global_step == 2


class _Payload:
    """Pickles to a call that writes a marker file when unpickled (stands for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_loading_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(OneBitInputError, match=r"evil\.ckpt cannot be read as a checkpoint"):
        ck.load_checkpoint_file(path)
    # even with a matching sidecar, and through Lightning's I/O asked for weights_only=False
    ck.write_checkpoint({"state_dict": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(OneBitInputError, match="cannot be loaded safely"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    keep = _write(tmp_path, 2)
    (tmp_path / ".step00000004.ckpt.tmp123").write_bytes(b"half")
    (tmp_path / ".step00000004.ckpt.tmp123.meta.json").write_text("{}")
    removed = ck.remove_stale_temporaries(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep.name, keep.name + ".meta.json"]
