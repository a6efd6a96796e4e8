"""Two processes on CPU (gloo) train like one: DDP and FSDP2 (``trainer=fsdp``) runs of the tiny
model follow the single-process loss curve with the same global batch, and a sharded FSDP2
checkpoint resumes and exports the same 1-bit model as the single-process run."""

from __future__ import annotations

import json
import signal
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onebit.checkpoint import (
    MANIFEST,
    check_checkpoint,
    consolidate,
    find_resume_checkpoint,
    sharded_shapes,
)
from onebit.export_checkpoint import main as export_main

from ..conftest import REPO
from ..reliability.conftest import FAULTS, train_proc
from .conftest import TINY

pytestmark = pytest.mark.slow

STEPS = 6
BASE = [o for o in TINY if not o.startswith(("trainer=", "data.batch_size="))]
COMMON = [
    "quant=onebit_paper",  # the paper's layer (calibrated gains: test_fsdp2_with_calibrated_gains)
    # latent weights start as W, not sign(W)·0.01: with Adam's first steps of exactly ±lr, a
    # latent of ±0.01 lands on zero and its sign is decided by rounding (chaotic in any run)
    "quant.latent_init=weight",
    "trainer.accelerator=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "validate_before_training=false",
]
SINGLE = ["trainer=default", "trainer.devices=1", "data.batch_size=4"]
DDP = ["trainer=default", "trainer.devices=2", "+trainer.strategy=ddp", "data.batch_size=2"]
FSDP = ["trainer=fsdp", "trainer.devices=2", "data.batch_size=2", "fsdp.param_dtype=null"]


def _losses(path: Path) -> list[float]:
    """Per optimizer step, the loss of the global batch: the token-weighted mean over ranks."""
    by_step: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]].append((r["loss"], r["tokens"]))
    return [
        sum(loss * n for loss, n in by_step[s]) / sum(n for _, n in by_step[s])
        for s in sorted(by_step)
    ]


def _run(tmp: Path, name: str, *overrides: str, common: list[str] = COMMON):
    run_dir = tmp / name / "run"
    run_dir.mkdir(parents=True)
    log = run_dir.parent / "loss.jsonl"
    done = train_proc(run_dir, *common, *overrides, *_loss_log(log), base=BASE, cache=tmp / "cache")
    return run_dir, log, done


def _loss_log(path: Path) -> list[str]:
    """Overrides that make every rank record its loss per step in ``path`` (``_losses``)."""
    return [
        "+callbacks.losslog._target_=tests.train.recorders.LossLog",
        f"+callbacks.losslog.path={path}",
    ]


def _launched_fsdp2(tmp: Path, log: Path) -> list[str]:
    """train.py overrides for a launch script starting a 2-process fp32 FSDP2 run (the script
    adds trainer=fsdp, the node and device counts, the run directory)."""
    return [
        *BASE,
        *COMMON,
        "logger=none",
        "data.batch_size=2",
        "fsdp.param_dtype=null",
        f"paths.cache_dir={tmp / 'cache'}",
        *_loss_log(log),
    ]


def _assert_follows(log: Path, single: tuple[Path, list[float]], run_dir: Path | None = None):
    """Both ranks logged, the global-batch loss equals the single-process one at every step,
    and (with ``run_dir``) the run exported the single-process model."""
    assert {json.loads(ln)["rank"] for ln in log.read_text().splitlines()} == {0, 1}
    losses = _losses(log)
    assert len(losses) == STEPS == len(single[1])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single[1]), rtol=1e-4, atol=0)
    if run_dir is not None:
        _assert_same_export(_export(single[0]), _export(run_dir))
    return losses


def _assert_same_diagnostics(single_dir: Path, run_dir: Path) -> None:
    """The diagnostics callback's first and last reports (``result.json``) of a run of two
    processes are the single process's: the same sequences (both ranks' first validation
    batches) through the same models."""
    one, two = (json.loads((d / "result.json").read_text())["diagnostics"]
                for d in (single_dir, run_dir))  # fmt: skip
    for when in ("first", "last"):
        assert two[when].keys() == one[when].keys()
        assert {"flip_frac", "block_rel_err_mean", "attn_sink_student_mean"} <= one[when].keys()
        for key, value in one[when].items():
            assert two[when][key] == pytest.approx(value, rel=1e-3, abs=1e-6), (when, key)
    assert one["last"]["flip_frac"] > 0  # trained: signs moved, so the check compares something


def _export(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "onebit_model" / "model.safetensors")


def _assert_same_export(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.dtype == torch.uint8:  # packed signs: every bit the same
            assert torch.equal(v, b[k]), k
        else:  # fp16 value vectors and full-precision parts, summed in another order
            torch.testing.assert_close(b[k].float(), v.float(), rtol=2e-3, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, list[float]]:
    tmp = tmp_path_factory.mktemp("single")
    run_dir, log, done = _run(tmp, "single", *SINGLE)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, _losses(log)


def test_fsdp2_with_calibrated_gains_follows_the_single_process_curve(tmp_path: Path) -> None:
    """quant=onebit (output gains calibrated before training): FSDP2 calibrates the whole student
    on every rank, then shards it; the curve and the export are the single process's."""
    common = [c for c in COMMON if not c.startswith("quant=")]  # quant=onebit: the default
    gains = ["quant.calibration_sequences=4"]
    run_one, log_one, done = _run(tmp_path, "single", *SINGLE, *gains, common=common)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, log, done = _run(tmp_path, "fsdp", *FSDP, *gains, common=common)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_follows(log, (run_one, _losses(log_one)), run_dir)
    gain = _export(run_dir)["model.layers.0.mlp.down_proj.out_gain"].float()
    assert not torch.equal(gain, torch.ones_like(gain))  # calibrated, not left at 1


def test_fsdp2_block_wise_stage_trains_the_blocks_of_the_single_process(tmp_path: Path) -> None:
    """blockwise.steps>0 under trainer=fsdp: every rank reconstructs the sharded blocks on the
    same sequences; block errors, loss curve and export are the single process's."""
    stage = ["blockwise.steps=3", "blockwise.sequences=4", "blockwise.batch_size=2"]
    run_one, log_one, done = _run(tmp_path, "single", *SINGLE, *stage)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, log, done = _run(tmp_path, "fsdp", *FSDP, *stage)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_follows(log, (run_one, _losses(log_one)), run_dir)
    one, two = (json.loads((d / "result.json").read_text())["blockwise"]["blocks"]
                for d in (run_one, run_dir))  # fmt: skip
    assert [b["block"] for b in two] == [0, 1]
    for a, b in zip(two, one, strict=True):
        assert b["rel_err_after"] < b["rel_err_before"]
        assert a["rel_err_after"] == pytest.approx(b["rel_err_after"], rel=1e-4)
    assert sorted(p.name for p in run_dir.glob("blockwise_state.pt*")) == [
        f"blockwise_state.pt.rank{r}{s}" for r in (0, 1) for s in ("", ".block0000", ".block0001")
    ]


def test_fsdp2_with_the_attention_term_follows_the_single_process_curve(
    tmp_path: Path, single
) -> None:
    """loss.attention_weight > 0 (eager attention's maps of both models, KL per head) under
    trainer=fsdp: the curve and the export are the single process's."""
    attention = ["loss.attention_weight=1.0"]
    run_one, log_one, done = _run(tmp_path, "single", *SINGLE, *attention)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, log, done = _run(tmp_path, "fsdp", *FSDP, *attention)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_follows(log, (run_one, _losses(log_one)), run_dir)
    # the term counted: the first step's loss is the plain recipe's plus a positive KL
    assert _losses(log_one)[0] > single[1][0] + 1e-4


def test_ddp_two_processes_follow_the_single_process_loss_curve(tmp_path: Path, single) -> None:
    run_dir, log, done = _run(tmp_path, "ddp", *DDP)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _assert_follows(log, single)
    assert losses[-1] < losses[0]  # it trains
    _assert_same_diagnostics(single[0], run_dir)


def test_fsdp2_two_processes_follow_the_single_process_curve_and_export_the_same_model(
    tmp_path: Path, single
) -> None:
    run_dir, log, done = _run(tmp_path, "fsdp", *FSDP)
    assert done.returncode == 0, done.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (last / MANIFEST).is_file()  # sharded: FSDP2 ran
    _assert_follows(log, single, run_dir)
    _assert_same_diagnostics(single[0], run_dir)  # the sharded student diagnosed on all ranks
    # the sharded checkpoint, consolidated and exported later in one process: the same model
    export_main([str(last), str(tmp_path / "again")])
    again, ours = load_file(tmp_path / "again" / "model.safetensors"), _export(run_dir)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)
    # evaluate.py source=checkpoint reads it too: the student holds the checkpoint's tensors
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    model, _, _ = cli.load_for_eval(
        OmegaConf.create({"source": "checkpoint", "path": str(last), "dtype": "float32"})
    )
    state = model.state_dict()
    full = consolidate(last)["state_dict"]
    assert {f"student.{k}" for k in state} == set(full)
    assert all(torch.equal(state[k.removeprefix("student.")], v) for k, v in full.items())


def test_fsdp2_sharded_checkpoint_resumes_and_exports_the_single_process_model(
    tmp_path: Path, single
) -> None:
    every = ["callbacks.resume.every_n_train_steps=2"]
    stop = [
        f"+callbacks.signal._target_={FAULTS}.SendSignal",
        "+callbacks.signal.at_step=4",
        "+callbacks.signal.rank=1",  # one rank's signal stops both at the same step
    ]
    run_dir, _, stopped = _run(tmp_path, "fsdp", *FSDP, *every, *stop)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]

    ckpt = run_dir / "checkpoints" / "step00000004.ckpt"
    assert ckpt.is_dir() and (ckpt / MANIFEST).is_file()  # one shard file per rank
    assert len(list(ckpt.glob("*.distcp"))) == 2
    result = check_checkpoint(ckpt)
    assert result.ok and result.global_step == 4
    assert find_resume_checkpoint(run_dir / "checkpoints")[0] == ckpt
    shapes = sharded_shapes(ckpt)
    latent = [k for k in shapes if k.endswith("self_attn.q_proj.weight")]
    assert latent and all(len(shapes[k]) == 2 for k in latent)  # full shapes, not shards

    # consolidated without a process group: an ordinary full checkpoint of the same step
    full = consolidate(ckpt)
    assert full["global_step"] == 4
    assert set(full["state_dict"]) == set(shapes)
    assert all(v.dtype == torch.float32 for k, v in full["state_dict"].items() if k in latent)

    resumed = train_proc(
        run_dir, *COMMON, *FSDP, *every, "ckpt_path=auto", base=BASE, cache=tmp_path / "cache"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((run_dir / "result.json").read_text())
    assert info["resumed_from"].endswith("step00000004.ckpt") and info["global_step"] == STEPS
    _assert_same_export(_export(single[0]), _export(run_dir))


def test_fsdp2_bf16_mixed_precision_keeps_fp32_masters_and_checkpoints(tmp_path: Path) -> None:
    run_dir, log, done = _run(
        tmp_path,
        "bf16",
        *[o for o in FSDP if not o.startswith("fsdp.")],  # fsdp.param_dtype=bfloat16: the default
        "activation_checkpointing=true",
        "callbacks.resume.every_n_train_steps=3",
        "export=false",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(log)
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    ckpt = run_dir / "checkpoints" / f"step{STEPS:08d}.ckpt"
    state = consolidate(ckpt)["state_dict"]
    onebit = [k for k in state if k.endswith(("in_scale", "out_scale", "q_proj.weight"))]
    assert onebit and all(state[k].dtype == torch.float32 for k in onebit)
    # no export asked for: nothing gathered, the footprint read off the architecture
    assert not (run_dir / "onebit_model").exists()
    footprint = json.loads((run_dir / "result.json").read_text())["footprint"]
    assert footprint["quantized_layers"] == 14


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_follow_the_single_process_curve(tmp_path: Path, single) -> None:
    # docs/launch/torchrun.sh as on two nodes (here two torchrun agents on one machine, one
    # process each): trainer.num_nodes=2, the mesh spans both "nodes"
    import os
    import subprocess

    run_dir, log = tmp_path / "run", tmp_path / "loss.jsonl"
    env = {
        **os.environ,
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(_free_port()),
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            ["bash", "docs/launch/torchrun.sh", *_launched_fsdp2(tmp_path, log)],
            cwd=REPO,
            env={**env, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    _assert_follows(log, single, run_dir)
    assert json.loads((run_dir / "result.json").read_text())["global_step"] == STEPS


FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun on one machine: SLURM_NTASKS copies of the command, with the variables srun
# sets for each task; exits with the first non-zero status
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_slurm_script_under_a_stand_in_srun_follows_the_single_process_curve(
    tmp_path: Path, single
) -> None:
    # docs/launch/slurm_fsdp.sbatch run as sbatch would (its plan step, then srun with 2 tasks on
    # one node); SLURM itself is not here, so srun is a stand-in that sets SLURM's variables
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    run_dir, log = tmp_path / "run", tmp_path / "loss.jsonl"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "onebit",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
    }
    runs = REPO / "outputs" / "train" / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    done = subprocess.run(
        ["bash", "docs/launch/slurm_fsdp.sbatch", *_launched_fsdp2(tmp_path, log)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "per GPU" in done.stdout or "GiB" in done.stdout  # the plan step printed its table
    _assert_follows(log, single, run_dir)
    assert (run_dir / "train_rank1.log").is_file()  # rank 1 logs beside rank 0
    assert (run_dir / "plan" / "train.log").is_file()  # the plan step logs into the run too
    assert (set(runs.iterdir()) if runs.is_dir() else set()) == before  # no stray run directory
