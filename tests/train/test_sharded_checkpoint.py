"""Sharded (FSDP2) checkpoint directories: checked against their manifest, found by
``ckpt_path=auto``, their interrupted writes cleaned up (no process group needed here; the
2-process runs are in test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onebit import checkpoint as ck
from onebit.checkpoint import MANIFEST, check_sharded, consolidate, write_manifest
from onebit.errors import OneBitInputError


def _sharded(directory: Path, step: int, name: str | None = None) -> Path:
    """A directory shaped like a sharded checkpoint: two shard files and the manifest."""
    path = directory / (name or f"step{step:08d}.ckpt")
    path.mkdir(parents=True)
    for rank in range(2):
        (path / f"__{rank}_0.distcp").write_bytes(bytes([step, rank]) * 1000)
    (path / ".metadata").write_bytes(b"metadata")
    write_manifest(path, step)
    return path


def test_a_complete_sharded_checkpoint_is_good_and_knows_its_step(tmp_path: Path) -> None:
    path = _sharded(tmp_path, 4)
    assert check_sharded(path) == (True, None, 4)
    result = ck.check_checkpoint(path)
    assert result.ok and result.verified and result.global_step == 4


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "__1_0.distcp of 1,000 bytes, 2,000 written"),
        ("flip", "corrupt __1_0.distcp"),
        ("remove", "lacks its shard file __1_0.distcp"),
        ("no_manifest", f"without a readable {MANIFEST}"),
    ],
)
def test_a_damaged_sharded_checkpoint_is_named_and_the_previous_one_used(
    tmp_path: Path, damage: str, reason: str
) -> None:
    _sharded(tmp_path, 2)
    newest = _sharded(tmp_path, 4)
    shard = newest / "__1_0.distcp"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[7] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "remove":
        shard.unlink()
    else:
        (newest / MANIFEST).unlink()
    result = ck.check_checkpoint(newest)
    assert not result.ok and reason in result.reason
    found, bad = ck.find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step00000002.ckpt"
    assert [r.path for r in bad] == [newest]
    with pytest.raises(OneBitInputError, match=r"step00000004\.ckpt"):
        consolidate(newest)


def test_sharded_and_single_file_checkpoints_are_ranked_together(tmp_path: Path) -> None:
    ck.write_checkpoint({"global_step": 6, "state_dict": {}}, tmp_path / "step00000006.ckpt")
    _sharded(tmp_path, 8)
    assert ck.find_resume_checkpoint(tmp_path)[0] == tmp_path / "step00000008.ckpt"
    assert ck.resolve_ckpt_path("auto", tmp_path) == tmp_path / "step00000008.ckpt"


def test_an_interrupted_sharded_write_is_ignored_and_removed(tmp_path: Path) -> None:
    good = _sharded(tmp_path, 2)
    partial = tmp_path / ".step00000004.ckpt.tmp1234"  # what a killed run leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert ck.find_resume_checkpoint(tmp_path) == (good, [])
    assert ck.remove_stale_temporaries(tmp_path) == [partial]
    assert not partial.exists() and good.is_dir()
