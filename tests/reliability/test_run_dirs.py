"""Everything around a run: one run per run directory, no tool writing over what it did not make,
a rejected command changing nothing, a changed data shape on resume refused, and exports that a
full disk or a flipped byte cannot pass off as good (issue: reliability II)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from onebit.checkpoint import check_checkpoint

from ..conftest import REPO
from .conftest import assert_one_sentence, cli, tiny, train_proc


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) → the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoints every 2, export) in ``<tmp>/out``."""
    tmp = tmp_path_factory.mktemp("finished")
    code, line, _ = cli(tiny(tmp, "callbacks.resume.every_n_train_steps=2"))
    assert code == 0, line
    return tmp


def _copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out"


def _export_cli(*argv: str, capsys) -> tuple[int, str]:
    from onebit.export_checkpoint import main

    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, (err[-1] if err else "")


# 1. the export tools replace an earlier export, nothing else ------------------------------------
def test_export_checkpoint_refuses_a_folder_that_is_not_an_export(
    finished: Path, tmp_path: Path, capsys
) -> None:
    out = _copy_run(finished, tmp_path / "run")
    target = tmp_path / "copy_of_run"
    shutil.copytree(out, target)
    (target / "my_notes.txt").write_text("do not lose me")
    before = _snapshot(target)
    code, line = _export_cli(str(out / "checkpoints" / "last.ckpt"), str(target), capsys=capsys)
    assert code == 2, line
    assert_one_sentence(line)
    assert line == (
        f"error: the export destination {target} is a non-empty folder that is not a OneBit "
        "export; nothing was written or deleted: give a new or empty folder (an earlier export "
        "is replaced, nothing else is)."
    )
    assert _snapshot(target) == before


def test_export_checkpoint_replaces_an_earlier_export_and_fills_an_empty_folder(
    finished: Path, tmp_path: Path, capsys
) -> None:
    from onebit.export import load_onebit

    out = _copy_run(finished, tmp_path / "run")
    ckpt = str(out / "checkpoints" / "last.ckpt")
    earlier = tmp_path / "earlier"
    shutil.copytree(out / "onebit_model", earlier)
    (earlier / "model.safetensors").write_bytes(b"not the model")
    assert _export_cli(ckpt, str(earlier), capsys=capsys)[0] == 0
    assert (earlier / "model.safetensors").read_bytes() != b"not the model"
    load_onebit(earlier)  # a whole export, its checksum matching
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export_cli(ckpt, str(empty), capsys=capsys)[0] == 0
    load_onebit(empty)


def test_train_refuses_an_export_path_that_is_not_an_export_before_training(
    tmp_path: Path,
) -> None:
    cfg = tiny(tmp_path)
    mine = Path(cfg.paths.output_dir) / "onebit_model"
    mine.mkdir(parents=True)
    (mine / "results.csv").write_text("mine")
    code, line, _ = cli(cfg)
    assert code == 2, line
    assert f"the export destination {mine} is a non-empty folder" in line
    assert (mine / "results.csv").read_text() == "mine"
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # refused before training


# 2. a finished run is never overwritten by a new one ---------------------------------------------
def test_a_new_run_in_a_finished_run_directory_is_refused(finished: Path, tmp_path: Path) -> None:
    out = _copy_run(finished, tmp_path)
    before = _snapshot(out)
    code, line, _ = cli(tiny(tmp_path, "trainer.max_steps=2"))
    assert code == 2, line
    assert_one_sentence(line)
    assert line.startswith(f"error: hydra.run.dir={out} already holds a run (checkpoints/")
    assert "resume it with ckpt_path=auto" in line
    assert _snapshot(out) == before
    assert check_checkpoint(out / "checkpoints" / "last.ckpt").global_step == 4


def test_the_finished_run_resumes_with_ckpt_path_auto(finished: Path, tmp_path: Path) -> None:
    out = _copy_run(finished, tmp_path)
    code, line, _ = cli(tiny(tmp_path, "trainer.max_steps=6", "ckpt_path=auto"))
    assert code == 0, line
    assert check_checkpoint(out / "checkpoints" / "last.ckpt").global_step == 6


# 3. one run at a time in a run directory -------------------------------------------------------
def test_a_second_run_in_a_directory_in_use_is_refused_and_a_killed_holder_frees_it(
    finished: Path, tmp_path: Path
) -> None:
    out = _copy_run(finished, tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from onebit.train.rundir import RunDirLock; "
            "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        code, line, _ = cli(
            tiny(tmp_path, "trainer.max_steps=6", "ckpt_path=auto", "optim.lr=3e-3", "seed=1")
        )
        assert code == 2, line
        assert_one_sentence(line)
        assert line == (
            f"error: hydra.run.dir={out} is in use by another run (process {holder.pid}); wait "
            "for it to end, or give another hydra.run.dir (nothing there was changed)."
        )
        assert _snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run: its lock goes with it
        holder.wait()
    code, line, _ = cli(tiny(tmp_path, "trainer.max_steps=6", "ckpt_path=auto"))
    assert code == 0, line
    assert check_checkpoint(out / "checkpoints" / "last.ckpt").global_step == 6


def test_the_lock_is_held_during_the_run_and_released_after(tmp_path: Path) -> None:
    from onebit.errors import OneBitInputError
    from onebit.train.rundir import RunDirLock

    seen = []
    cfg = tiny(tmp_path, "trainer.max_steps=2")
    out = Path(cfg.paths.output_dir)
    import lightning as L

    class TryLock(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            try:
                RunDirLock(out).acquire().release()
                seen.append("acquired")
            except OneBitInputError:
                seen.append("refused")

    import train

    real = train.build_callbacks
    try:
        train.build_callbacks = lambda c: [*real(c), TryLock()]
        code, line, _ = cli(cfg)
    finally:
        train.build_callbacks = real
    assert code == 0, line
    assert seen == ["refused", "refused"]
    RunDirLock(out).acquire().release()  # free again after the run


# 4. the README's sweep command -----------------------------------------------------------------
def test_the_readme_sweep_command_runs_from_any_directory(tmp_path: Path) -> None:
    """``python train.py -m optim.lr=1e-4,4e-4`` with no ``hydra.sweep.dir``: the sweep directory
    resolves (it read ``hydra:runtime.cwd`` before Hydra had set it), under the launch folder."""
    from ..train.conftest import TINY

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    tiny_args = [a for a in TINY if not a.startswith("optim.lr=")]  # the sweep sets it
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "optim.lr=1e-4,4e-4", *tiny_args]
    cmd += ["logger=none", "trainer.max_steps=2", "export=false"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs" / "train" / "multiruns").glob("*/*/result.json"))
    assert len(jobs) == 2
    lrs = sorted(
        float(line.split("=")[1])
        for j in jobs
        for line in (j.parent / ".hydra" / "overrides.yaml").read_text().split()
        if line.startswith("optim.lr=")
    )
    assert lrs == [1e-4, 4e-4]


# 5. every checkpoint damaged: refuse, never start over on top of them ---------------------------
def test_auto_with_only_damaged_checkpoints_refuses_and_names_them(
    finished: Path, tmp_path: Path
) -> None:
    out = _copy_run(finished, tmp_path)
    ckpts = out / "checkpoints"
    for p in ckpts.glob("*.ckpt"):
        p.write_bytes(p.read_bytes()[:500])
    before = _snapshot(out)
    code, line, _ = cli(tiny(tmp_path, "trainer.max_steps=6", "ckpt_path=auto"))
    assert code == 2, line
    assert_one_sentence(line)
    assert line.startswith(f"error: ckpt_path=auto found no usable checkpoint in {ckpts}, only ")
    for p in ckpts.glob("*.ckpt"):
        assert f"{p.name} is truncated" in line
    assert "move the damaged files away to start this run afresh" in line
    assert _snapshot(out) == before


# 7. a full disk while exporting: one sentence, exit 3, the earlier export intact ----------------
def _safetensors_full(state, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


def test_disk_full_in_export_checkpoint_is_one_sentence_and_exit_3(
    finished: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = _copy_run(finished, tmp_path / "run")
    target = tmp_path / "export"
    shutil.copytree(out / "onebit_model", target)
    before = _snapshot(target)
    monkeypatch.setattr("safetensors.torch.save_file", _safetensors_full)
    code, line = _export_cli(str(out / "checkpoints" / "last.ckpt"), str(target), capsys=capsys)
    assert code == 3, line
    assert line == (
        f"error: could not write the 1-bit model to {target} (the disk is full); nothing was "
        "replaced (an earlier export there is intact): free space and run the command again."
    )
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_disk_full_in_the_end_of_run_export_is_one_sentence_and_exit_3(
    finished: Path, tmp_path: Path, monkeypatch
) -> None:
    out = _copy_run(finished, tmp_path)
    before = _snapshot(out / "onebit_model")
    monkeypatch.setattr("safetensors.torch.save_file", _safetensors_full)
    code, line, _ = cli(tiny(tmp_path, "ckpt_path=auto"))
    assert code == 3, line
    assert_one_sentence(line)
    assert line.startswith(f"error: could not export the 1-bit model to {out / 'onebit_model'} ")
    assert "(the disk is full); nothing was replaced (the previous export there is intact)" in line
    assert _snapshot(out / "onebit_model") == before


def test_a_file_size_limit_in_export_checkpoint_is_one_sentence_and_exit_3(
    finished: Path, tmp_path: Path
) -> None:
    """A real write failure (RLIMIT_FSIZE), not a patched one, reaches the same sentence."""
    out = _copy_run(finished, tmp_path / "run")
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from onebit.export_checkpoint import main; main(sys.argv[1:])"
    )
    target = tmp_path / "export"
    ckpt = str(out / "checkpoints" / "last.ckpt")
    p = subprocess.run(
        [sys.executable, "-c", code, ckpt, str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 3, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line == (
        f"error: could not write the 1-bit model to {target} (File too large); nothing was "
        "replaced (none existed): free space and run the command again."
    )
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# 8. a rejected command changes nothing in the run directory -------------------------------------
def test_a_rejected_command_leaves_the_run_directory_as_it_was(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = train_proc(run_dir, "trainer.max_steps=2", "export=false")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    before = _snapshot(run_dir)
    p = train_proc(run_dir, "trainer.max_steps=4", "ckpt_path=auto", "loss.hidden_weight=-1")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "loss.hidden_weight=-1" in p.stderr.strip().splitlines()[-1]
    after = _snapshot(run_dir)
    assert after == before


def test_a_resume_keeps_the_runs_saved_config_and_records_its_own(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train_proc(run_dir, "trainer.max_steps=2", "export=false").returncode == 0
    first = (run_dir / ".hydra" / "config.yaml").read_text()
    p = train_proc(run_dir, "trainer.max_steps=4", "ckpt_path=auto", "export=false")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == first
    (resumed,) = sorted((run_dir / ".hydra").glob("resumed-*"))
    assert "ckpt_path=auto" in (resumed / "overrides.yaml").read_text()
    assert "max_steps: 4" in (resumed / "config.yaml").read_text()


# 9. a changed data shape on resume --------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "saved"),
    [("data.seq_len=8", "data.seq_len=16"), ("data.batch_size=4", "data.batch_size=2")],
)
def test_resuming_with_another_data_shape_is_refused(
    finished: Path, tmp_path: Path, override: str, saved: str
) -> None:
    out = _copy_run(finished, tmp_path)
    code, line, _ = cli(tiny(tmp_path, "trainer.max_steps=6", "ckpt_path=auto", override))
    assert code == 2, line
    assert_one_sentence(line)
    now = override.split("=")[1]
    assert line == (
        f"error: the checkpoint's data position was saved with {saved}; resume with the same "
        f"value (now {now}), or start a new run to change it."
    )
    assert check_checkpoint(out / "checkpoints" / "last.ckpt").global_step == 4


# 12. exports: a checksum, and the umask's permissions -------------------------------------------
def test_an_export_changed_after_writing_is_refused_by_its_checksum(
    finished: Path, tmp_path: Path
) -> None:
    from onebit.errors import OneBitInputError
    from onebit.export import load_onebit

    export = _copy_run(finished, tmp_path) / "onebit_model"
    info = json.loads((export / "config.json").read_text())["onebit"]
    assert len(info["weights_sha256"]) == 64
    data = bytearray((export / "model.safetensors").read_bytes())
    data[-3] ^= 0x7F  # one byte of the last tensor: a value, no format damage
    (export / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(OneBitInputError, match=r"does not match the checksum in its config\.json"):
        load_onebit(export)
    load_onebit(export, verify=False)  # the check can be skipped knowingly


def test_exports_get_the_permissions_of_the_umask(finished: Path, tmp_path: Path, capsys) -> None:
    out = _copy_run(finished, tmp_path / "run")
    old = os.umask(0o022)
    try:
        assert (
            _export_cli(str(out / "checkpoints" / "last.ckpt"), str(tmp_path / "e"), capsys=capsys)[
                0
            ]
            == 0
        )
    finally:
        os.umask(old)
    assert (tmp_path / "e").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "e").iterdir()} == {0o644}


def test_save_onebit_refuses_a_file_as_destination(tmp_path: Path) -> None:
    from onebit.errors import OneBitInputError
    from onebit.export import check_export_destination

    f = tmp_path / "model"
    f.write_text("x")
    with pytest.raises(OneBitInputError, match="exists and is not a folder"):
        check_export_destination(f)
    assert f.read_text() == "x"


def test_a_forked_child_of_a_killed_run_does_not_keep_its_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked: they must not hold the run's lock after it is killed."""
    from onebit.train.rundir import RunDirLock

    script = (
        "import os, sys, time; from pathlib import Path; "
        "from onebit.train.rundir import RunDirLock; "
        "RunDirLock(Path(sys.argv[1])).acquire(); child = os.fork(); "
        "time.sleep(120) if child == 0 else None; print(child, flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child still lives
        RunDirLock(tmp_path).acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_runs_export_has_a_model_card_with_its_command_and_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = train_proc(run_dir, "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert p.returncode == 0, p.stderr[-2000:]
    card = (run_dir / "onebit_model" / "README.md").read_text()
    assert "```bash\npython train.py " in card and "trainer.max_steps=2" in card
    result = json.loads((run_dir / "result.json").read_text())
    assert f"| `val/ppl` | {result['metrics']['val/ppl']:.4g} |" in card
