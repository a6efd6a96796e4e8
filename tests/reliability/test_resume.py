"""Kill and resume: a run stopped by SIGTERM/SIGUSR1, killed with SIGKILL (mid-step, mid-checkpoint
write, mid-epoch of a streaming data set) or left with a truncated checkpoint resumes from its last
good checkpoint to the same step count, data position and final weights as an uninterrupted run
with the same seed, bitwise on CPU."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest

from onebit.checkpoint import check_checkpoint

from ..conftest import shared_path
from ..train.conftest import TINY
from .conftest import FAULTS, assert_one_sentence, assert_same_training_state, cli, tiny, train_proc

STEPS = 8
EVERY = 2
COMMON = [
    f"trainer.max_steps={STEPS}",
    f"callbacks.resume.every_n_train_steps={EVERY}",
    "export=false",
]


def _ckpts(out: Path) -> Path:
    return out / "checkpoints"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (in this process, one thread): its checkpoint after the last step.

    Subprocess runs (one thread too) are compared with it, which also shows that the numbers do
    not depend on the process.
    """
    import torch

    tmp = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, line, _ = cli(tiny(tmp, *COMMON))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, line
    return _ckpts(tmp / "out") / f"step{STEPS:08d}.ckpt"


def _fake_scontrol(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_stops_and_resumes_to_the_same_weights(
    sig: str, tmp_path: Path, reference: Path, one_thread, monkeypatch
) -> None:
    if sig == "SIGUSR1":  # SLURM's time-limit warning (sbatch --signal=USR1@120): requeue
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("PATH", f"{_fake_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    stopped = tiny(
        tmp_path,
        *COMMON,
        f"+callbacks.signal._target_={FAULTS}.SendSignal",
        "+callbacks.signal.at_step=5",
        f"+callbacks.signal.signal={sig}",
    )
    code, line, _ = cli(stopped)
    signum = getattr(signal, sig)
    assert code == 128 + signum, line
    out = Path(stopped.paths.output_dir)
    saved = _ckpts(out) / "step00000005.ckpt"
    assert_one_sentence(line, "stopped: ")
    assert line.startswith(f"stopped: {sig} at step 5: the training state is saved in {saved};")
    assert check_checkpoint(saved).ok and check_checkpoint(saved).global_step == 5
    assert not (out / "result.json").exists()  # the run is not reported as finished
    if sig == "SIGUSR1":
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    resumed = tiny(tmp_path, *COMMON, "ckpt_path=auto")
    code, line, _ = cli(resumed)
    assert code == 0, line
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == str(saved) and result["global_step"] == STEPS
    assert_same_training_state(_ckpts(out) / f"step{STEPS:08d}.ckpt", reference)
    assert_same_training_state(_ckpts(out) / "last.ckpt", reference)  # replaced, not last-v1
    assert not list(_ckpts(out).glob("last-v*"))


def test_truncated_checkpoint_resumes_from_the_previous_good_one(
    tmp_path: Path, reference: Path, one_thread, caplog
) -> None:
    stopped = tiny(
        tmp_path,
        *COMMON,
        "callbacks.checkpoint.save_last=false",  # only the periodic checkpoints, for clarity
        "callbacks.checkpoint.save_top_k=0",
        f"+callbacks.signal._target_={FAULTS}.SendSignal",
        "+callbacks.signal.at_step=6",
    )
    assert cli(stopped)[0] == 128 + signal.SIGTERM
    out = Path(stopped.paths.output_dir)
    newest = _ckpts(out) / "step00000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short, a disk error

    resumed = tiny(
        tmp_path,
        *COMMON,
        "callbacks.checkpoint.save_last=false",
        "callbacks.checkpoint.save_top_k=0",
        "ckpt_path=auto",
    )
    code, line, _ = cli(resumed)
    assert code == 0, line
    assert "step00000006.ckpt is truncated (1,000 bytes," in caplog.text
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"].endswith("step00000004.ckpt")
    assert_same_training_state(_ckpts(out) / f"step{STEPS:08d}.ckpt", reference)
    # the newest two periodic checkpoints are kept, the truncated one was overwritten
    assert sorted(p.name for p in _ckpts(out).glob("*.ckpt")) == [
        "step00000006.ckpt",
        "step00000008.ckpt",
    ]


def test_sigkill_during_a_checkpoint_write_resumes_to_the_same_weights(
    tmp_path: Path, reference: Path, one_thread
) -> None:
    run_dir = tmp_path / "out"
    killed = train_proc(
        run_dir,
        *COMMON,
        f"+callbacks.kill._target_={FAULTS}.KillDuringSave",
        "+callbacks.kill.at_step=6",
        cache=tmp_path / "cache",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in _ckpts(run_dir).iterdir())
    assert "step00000006.ckpt" not in names and ".step00000006.ckpt.tmp" in " ".join(names)
    assert check_checkpoint(_ckpts(run_dir) / "step00000004.ckpt").ok

    code, line, _ = cli(tiny(tmp_path, *COMMON, "ckpt_path=auto"))  # the same run directory
    assert code == 0, line
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_from"].endswith("step00000004.ckpt")
    assert_same_training_state(_ckpts(run_dir) / f"step{STEPS:08d}.ckpt", reference)
    assert not any(p.name.startswith(".") for p in _ckpts(run_dir).iterdir())  # cleaned up


def _trajectory(log: Path) -> dict[int, str]:
    """The batch each step finally trained on: a step redone after a kill counts once, as redone."""
    steps: dict[int, str] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        steps[entry["step"]] = entry["ids"]
    return steps


def _attempts(log: Path) -> list[list[int]]:
    runs: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        runs.setdefault(entry["pid"], []).append(entry["step"])
    return list(runs.values())


def _kill_at_random_steps(
    run_dir: Path, overrides: list[str], steps: int, kills: int, base: list[str]
) -> Path:
    """Start, SIGKILL at a random step (and a random moment in it) ``kills`` times, then finish."""
    log = run_dir.parent / "batches.jsonl"
    extra = [
        *overrides,
        f"+callbacks.log._target_={FAULTS}.BatchLog",
        f"+callbacks.log.path={log}",
        f"+callbacks.slow._target_={FAULTS}.SlowSteps",
        "+callbacks.slow.seconds=0.03",
        "ckpt_path=auto",
    ]
    rng = random.Random(1234)
    for _ in range(kills):
        seen = len(log.read_text().splitlines()) if log.exists() else 0
        target = seen + rng.randint(2, 6)
        proc = train_proc(run_dir, *extra, wait=False, base=base)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= target:
                time.sleep(rng.uniform(0, 0.05))  # anywhere in the step, or in a save
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = train_proc(run_dir, *extra, base=base)
    assert done.returncode == 0, done.stderr[-3000:]
    return log


def _reference_log(run_dir: Path, overrides: list[str], base: list[str]) -> Path:
    log = run_dir.parent / "batches.jsonl"
    done = train_proc(
        run_dir,
        *overrides,
        f"+callbacks.log._target_={FAULTS}.BatchLog",
        f"+callbacks.log.path={log}",
        base=base,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return log


def _check_killed_run(
    tmp_path: Path, overrides: list[str], steps: int, kills: int, base: list[str] = TINY
) -> None:
    ref_dir, run_dir = tmp_path / "ref" / "run", tmp_path / "killed" / "run"
    ref_log = _reference_log(ref_dir, overrides, base)
    log = _kill_at_random_steps(run_dir, overrides, steps, kills, base)
    attempts = _attempts(log)
    assert len(attempts) == kills + 1
    # later attempts start where a checkpoint left off (at 0 only if killed before the first)
    assert any(a and a[0] > 0 for a in attempts[1:]), attempts
    # same data, step for step: no batch repeated or skipped in the run's final history
    assert _trajectory(log) == _trajectory(ref_log)
    assert sorted(_trajectory(log)) == list(range(steps))
    assert_same_training_state(
        _ckpts(run_dir) / f"step{steps:08d}.ckpt", _ckpts(ref_dir) / f"step{steps:08d}.ckpt"
    )


@pytest.mark.slow
def test_sigkill_at_random_steps_self_generated(tmp_path: Path) -> None:
    # 24 sequences in batches of 2: 12 steps an epoch, so the kills also cross epoch boundaries
    steps = 30
    overrides = [
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=5",
        "callbacks.resume.every_n_train_steps=3",
        "export=false",
    ]
    _check_killed_run(tmp_path, overrides, steps, kills=4)


@pytest.mark.slow
def test_sigkill_at_random_steps_streaming_text(tmp_path: Path) -> None:
    # a streaming data set read by 2 DataLoader workers: killed mid-pass, it resumes mid-pass
    stories = shared_path("models", "stories260K-hf")
    wiki = shared_path("data", "wikitext2", "wiki.test.raw")
    steps = 24
    overrides = [
        "model=stories260k",
        f"model.path={stories}",
        "data=wikitext",
        "data.source=local",
        f"data.path={wiki}",
        "data.seq_len=64",
        "data.batch_size=2",
        "data.val_blocks=4",
        "data.num_workers=2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=6",
        "callbacks.resume.every_n_train_steps=3",
        "export=false",
    ]
    base = ["trainer=cpu_smoke", "optim.warmup_steps=2", "optim.lr=1e-2"]
    _check_killed_run(tmp_path, overrides, steps, kills=3, base=base)


DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp"]


@pytest.mark.slow
def test_ddp_signal_on_one_rank_stops_every_rank_at_one_step(tmp_path: Path) -> None:
    # plain ddp: Lightning starts train.py again for rank 1 (a script, not pytest)
    ref_dir, run_dir = tmp_path / "ref" / "run", tmp_path / "stopped" / "run"
    done = train_proc(ref_dir, *COMMON, *DDP)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = train_proc(
        run_dir,
        *COMMON,
        *DDP,
        f"+callbacks.signal._target_={FAULTS}.SendSignal",
        "+callbacks.signal.at_step=5",
        "+callbacks.signal.rank=1",  # only rank 1 gets it
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("stopped: ")]
    assert len(lines) == 2 and all(" at step 5: " in ln for ln in lines)  # both ranks
    resumed = train_proc(run_dir, *COMMON, *DDP, "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_from"].endswith("step00000005.ckpt")
    assert_same_training_state(
        _ckpts(run_dir) / f"step{STEPS:08d}.ckpt", _ckpts(ref_dir) / f"step{STEPS:08d}.ckpt"
    )


@pytest.mark.slow
def test_ddp_nan_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = train_proc(
        run_dir,
        *COMMON,
        *DDP,
        "guard.nonfinite=skip",
        f"+callbacks.nan._target_={FAULTS}.InjectNaN",
        "+callbacks.nan.at_step=3",
        "+callbacks.nan.target=model.layers.1.self_attn.o_proj",
        "+callbacks.nan.where=output",
        "+callbacks.nan.rank=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["nonfinite_skipped"] == 1 and result["global_step"] == STEPS
