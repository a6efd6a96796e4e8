"""Memory planner: counts from the real LLaMA architectures, and the official run's known facts."""

from __future__ import annotations

import pytest

from onebit.models import llama_config
from onebit.train.planner import GIB, PlanSettings, count_model, plan_memory


@pytest.fixture(scope="module")
def llama7b():
    return count_model(llama_config("7b"))


def test_counts_match_the_footprint_of_llama7b(llama7b) -> None:
    assert llama7b.quantized == 6_476_005_376  # as benchmarks/footprint_llama.py reports
    assert llama7b.full_precision == 262_410_240
    assert llama7b.value_vectors == 32 * (4 * 2 * 4096 + 2 * (4096 + 11008) + (11008 + 4096))
    assert (llama7b.layers, llama7b.hidden, llama7b.intermediate) == (32, 4096, 11008)


@pytest.mark.parametrize(
    ("world", "batch", "fits"),
    [
        (8, 4, True),  # the paper's LLaMA-7B setup (8×A100-80GB, batch 4, ZeRO-3)
        (3, 4, False),  # official issue #3: out of memory
        (3, 3, True),  # official issue #3: ran, reserving 80,406 of 81,920 MiB (calibration)
    ],
)
def test_official_recipe_agrees_with_the_known_runs(llama7b, world, batch, fits) -> None:
    settings = PlanSettings("zero3", world, batch, 2048, recipe="official", gpu_gib=80)
    plan = plan_memory(llama7b, settings)
    assert plan.fits is fits, plan.format("LLaMA-7B")


def test_batch_3_on_3_gpus_reproduces_the_reported_reservation(llama7b) -> None:
    plan = plan_memory(llama7b, PlanSettings("zero3", 3, 3, 2048, recipe="official"))
    assert plan.total / GIB == pytest.approx(80_406 / 1024, rel=0.01)


def test_sharding_divides_weights_and_ddp_replicates_them(llama7b) -> None:
    ddp = plan_memory(llama7b, PlanSettings("ddp", 8, 1, 512))
    fsdp = plan_memory(llama7b, PlanSettings("fsdp", 8, 1, 512))
    assert ddp.rows["student"] == pytest.approx(8 * fsdp.rows["student"])
    assert ddp.rows["teacher"] == pytest.approx(8 * fsdp.rows["teacher"])
    assert ddp.rows["activations"] == fsdp.rows["activations"]
    assert not ddp.fits and fsdp.fits  # 7B with Adam does not fit replicated on one 80 GB GPU


def test_checkpointing_keeps_one_block_of_saved_tensors(llama7b) -> None:
    on = plan_memory(llama7b, PlanSettings("fsdp", 8, 4, 2048, activation_checkpointing=True))
    off = plan_memory(llama7b, PlanSettings("fsdp", 8, 4, 2048, activation_checkpointing=False))
    assert off.rows["activations"] > 10 * on.rows["activations"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "zero2"}, "strategy='zero2' is not one of ddp, fsdp, zero3"),
        ({"recipe": "fast"}, "recipe='fast' is not one of ours, official"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        PlanSettings(**kwargs)


def _plan_cli(tmp_path, *overrides: str):
    import subprocess
    import sys

    from ..conftest import REPO

    return subprocess.run(
        [sys.executable, "train.py", "model=llama7b", "plan.enabled=true", "logger=none",
         f"hydra.run.dir={tmp_path}/run", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_train_py_prints_the_plan_offline(tmp_path) -> None:
    out = _plan_cli(
        tmp_path, "plan.strategy=zero3", "plan.recipe=official", "plan.world_size=3",
        "data.batch_size=4", "data.seq_len=2048", "activation_checkpointing=true",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory plan: llama7b, zero3 on 3 GPU(s) of 80 GiB" in out.stdout
    assert "activation checkpointing on" in out.stdout
    assert "does NOT fit in 80 GiB" in out.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained or loaded


def test_train_py_refuses_an_unknown_plan_strategy(tmp_path) -> None:
    out = _plan_cli(tmp_path, "plan.strategy=zero2")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: plan: strategy='zero2' is not one of ddp, fsdp, zero3."
    )


def test_the_plan_assumes_what_the_run_does(tmp_path) -> None:
    """One activation_checkpointing key for the run and its plan: the paper's experiments turn it
    on (they fit 8 x 80 GB only with it), a plain run leaves it off."""
    paper = _plan_cli(tmp_path, "experiment=onebit_llama7b", "plan.world_size=8")
    assert paper.returncode == 0, paper.stderr[-2000:]
    assert "activation checkpointing on" in paper.stdout and "does NOT fit" not in paper.stdout
    plain = _plan_cli(
        tmp_path, "plan.world_size=8", "plan.strategy=fsdp", "data.batch_size=4",
        "data.seq_len=2048",
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "activation checkpointing off" in plain.stdout and "does NOT fit" in plain.stdout
