"""Bad input: each case exits non-zero within seconds with one sentence naming the key or path,
before anything is written (no checkpoint, export, result, generated data or Hydra output)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onebit.errors import OneBitInputError
from onebit.train.preflight import check_command_line, check_no_secrets, per_device_batch

from ..conftest import REPO, shared_path
from ..train.conftest import TINY, compose_train
from .conftest import assert_one_sentence, cli, tiny

SECONDS = 10  # an in-process run's budget for failing (the model and data checks take ms)
VALID_MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def _fails(cfg, code: int = 2) -> str:
    """Run ``cfg`` through the CLI wrapper: the exit status, one sentence, fast, nothing written."""
    status, line, seconds = cli(cfg)
    assert status == code, line
    assert_one_sentence(line)
    assert seconds < SECONDS, seconds
    out, cache = Path(cfg.paths.output_dir), Path(cfg.paths.cache_dir)
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, written
    assert not (cache.exists() and any(cache.rglob("*.pt"))), "generated data was cached"
    return line.removeprefix("error: ")


def _script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


# -- the command line ------------------------------------------------------------------------------
def test_unknown_group_option_is_one_sentence_listing_the_valid_ones(tmp_path: Path) -> None:
    out = _script("train.py", "model=llama9b", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: model=llama9b is not an option of the model group; valid: "
        f"{', '.join(VALID_MODELS)}."
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra wrote anything


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("experiment=onebit_llama99b", "experiment=onebit_llama99b is not an option of the "),
        ("+data=imagenet", "data=imagenet is not an option of the data group; valid: c4, "),
        ("model=tiny_llama,tiny_nope", "model=tiny_nope is not an option of the model group"),
    ],
)
def test_group_options_are_checked(arg: str, expected: str) -> None:
    with pytest.raises(OneBitInputError) as e:
        check_command_line([arg], REPO / "conf")
    assert str(e.value).startswith(expected)


def test_valid_overrides_pass() -> None:
    check_command_line(
        [
            "-m",
            "model=tiny_llama,tiny_opt",
            "experiment=null",
            "hydra/launcher=submitit_slurm",  # Hydra's own plugins: not in conf/
            "data.greedy_tokens=3",
            "optim.lr=1e-3",
            "model.revision=0123456789abcdef0123456789abcdef01234567",
        ],
        REPO / "conf",
    )


@pytest.mark.parametrize(
    "arg", ["+logger.wandb.api_key=0123456789abcdef", "model.path=hf_" + "a1B2" * 9]
)
def test_a_secret_on_the_command_line_is_refused_before_hydra_saves_it(
    arg: str, tmp_path: Path
) -> None:
    out = _script("train.py", arg, f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2
    line = out.stderr.strip()
    assert line.startswith("error: the override ") and "set it in the environment" in line
    assert arg.split("=", 1)[1] not in out.stderr + out.stdout  # the value is never echoed
    assert not (tmp_path / "run").exists()


def test_a_secret_in_the_composed_config_is_refused() -> None:
    with pytest.raises(OneBitInputError, match=r"holds a secret at logger\.wandb\.api_key;"):
        check_no_secrets({"logger": {"wandb": {"api_key": "x", "project": "p"}}, "seed": 0})
    check_no_secrets({"data": {"greedy_tokens": 3}, "logger": {"wandb": {"api_key": None}}})


# -- the model -------------------------------------------------------------------------------------
def test_hub_model_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("onebit.hub.hub_reachable", lambda *a, **k: False)
    msg = _fails(tiny(tmp_path, "model=llama7b"))
    assert msg.startswith("the model 'huggyllama/llama-7b' is not in the local Hugging Face cache")
    assert "model.source=local model.path=" in msg


def test_hub_model_not_found(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoConfig

    def missing(name, local_files_only=False, **kw):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier.")

    monkeypatch.setattr("onebit.hub.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(AutoConfig, "from_pretrained", missing)
    msg = _fails(tiny(tmp_path, "model=llama7b", "model.path=nobody/no-such-model"))
    assert msg == (
        "the model 'nobody/no-such-model' could not be loaded from the Hugging Face Hub: "
        "nobody/no-such-model is not a local folder and is not a valid model identifier."
    )


def test_local_model_missing_or_not_a_model(tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    assert _fails(tiny(tmp_path, "model=local", f"model.path={nope}")) == (
        f"model.path={nope} does not exist."
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _fails(tiny(tmp_path, "model=local", f"model.path={empty}")) == (
        f"model.path={empty} is not a Hugging Face model directory (no config.json)."
    )
    (empty / "config.json").write_text("{ not json")
    msg = _fails(tiny(tmp_path, "model=local", f"model.path={empty}"))
    assert msg.startswith(f"the config of model {empty} cannot be read: ")


def test_remote_code_is_not_run_unless_trusted(tmp_path: Path) -> None:
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "config.json").write_text(
        '{"model_type": "custom_x", "auto_map": {"AutoConfig": "configuration_x.XConfig",'
        ' "AutoModelForCausalLM": "modeling_x.XModel"}}'
    )
    for name in ("configuration_x.py", "modeling_x.py"):
        (model / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    msg = _fails(tiny(tmp_path, "model=local", f"model.path={model}"))
    assert msg == (
        f"model {model} ships its own modelling code, which is not run unless you set "
        "model.trust_remote_code=true (only for code you trust)."
    )
    assert not marker.exists()


def test_every_model_config_keeps_remote_code_off() -> None:
    from omegaconf import OmegaConf

    from onebit.models import ModelSpec

    for name in VALID_MODELS:
        node = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
        assert "trust_remote_code" not in node, name
    assert ModelSpec.__dataclass_fields__["trust_remote_code"].default is False


# -- the data --------------------------------------------------------------------------------------
def test_sequence_longer_than_the_context(tmp_path: Path) -> None:
    assert _fails(tiny(tmp_path, "data.seq_len=256")) == (
        "data.seq_len=256 is above the context of model tiny_llama (128 positions); lower "
        "data.seq_len."
    )


def _text(tmp_path: Path, *overrides: str):
    stories = shared_path("models", "stories260K-hf")
    base = [o for o in TINY if not o.startswith(("model=", "data."))]
    return compose_train(
        [
            *base,
            "logger=none",
            "model=stories260k",
            f"model.path={stories}",
            "data=wikitext",
            "data.seq_len=64",
            "data.num_workers=0",
            *overrides,
        ],
        tmp_path,
    )


def test_text_data_offline_missing_empty_or_too_short(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("onebit.data.sources.hub_reachable", lambda *a, **k: False)
    msg = _fails(_text(tmp_path))
    assert "Salesforce/wikitext" in msg and "data.path=" in msg

    nope = tmp_path / "nope.txt"
    msg = _fails(_text(tmp_path, "data.source=local", f"data.path={nope}"))
    assert msg == f"data.path={str(nope)!r} matches no file."

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    msg = _fails(_text(tmp_path, "data.source=local", f"data.path={empty}"))
    assert msg.endswith("has 0 tokens for training, fewer than one block of seq_len=64.")

    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    msg = _fails(_text(tmp_path, "data.source=local", f"data.path={short}"))
    assert "tokens for training, fewer than one block of seq_len=64." in msg


def test_too_few_generated_sequences_for_one_batch(tmp_path: Path) -> None:
    assert _fails(tiny(tmp_path, "data.num_sequences=1")) == (
        "data.num_sequences=1 gives each of the 1 rank(s) 1 sequence(s), fewer than one batch "
        "of data.batch_size=2."
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1."),
        ("callbacks.resume.keep=0", "callbacks.resume.keep=0 must be an integer >= 1."),
    ],
)
def test_errors_of_configured_objects_are_not_wrapped(
    tmp_path: Path, override: str, expected: str
) -> None:
    # hydra.utils.instantiate wraps exceptions in a multi-line InstantiationException
    assert _fails(tiny(tmp_path, override)) == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "trainer.accelerator=gpu",
            "trainer.accelerator=gpu but this machine has no GPU that torch can use; on CPU add "
            "trainer.accelerator=cpu",
        ),
        (
            "+trainer.strategy=nope",
            "the trainer config cannot run here: You selected an invalid strategy name",
        ),
        (
            "+trainer.no_such_argument=1",
            "the trainer config cannot run here: Trainer.__init__() got an unexpected keyword",
        ),
        (
            "fsdp.param_dtype=int8",
            "fsdp.param_dtype='int8' is not one of float32, bfloat16, float16 or null.",
        ),
    ],
)
def test_a_trainer_this_machine_cannot_run_is_one_sentence(
    tmp_path: Path, override: str, expected: str
) -> None:
    if override.startswith("trainer.accelerator=gpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    assert _fails(tiny(tmp_path, override)).startswith(expected)


# -- the loss and the batch ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.hidden_weight=-1", "loss.hidden_weight=-1 must be a finite number >= 0."),
        ("loss.kd_weight=nan", "loss.kd_weight=nan must be a finite number >= 0."),
        ("loss.lm_weight=inf", "loss.lm_weight=inf must be a finite number >= 0."),
    ],
)
def test_negative_or_nan_loss_weights(tmp_path: Path, override: str, expected: str) -> None:
    assert _fails(tiny(tmp_path, override)) == expected


def test_a_bad_export_dtype_is_refused_before_training(tmp_path: Path) -> None:
    """export_dtype is read at the end of the run: a typo must not cost the training first."""
    assert _fails(tiny(tmp_path, "export_dtype=fp16")) == (
        "export_dtype='fp16' is not one of float32, bfloat16, float16."
    )


@pytest.mark.parametrize("script", ["evaluate.py", "generate.py"])
def test_a_bad_dtype_of_evaluate_and_generate_is_one_sentence(tmp_path: Path, script: str) -> None:
    import subprocess
    import sys

    from ..conftest import REPO

    logger = ["logger=none"] if script == "evaluate.py" else []
    out = subprocess.run(
        [sys.executable, script, "source=hf", "model=tiny_llama", "dtype=float8", *logger,
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: dtype='float8' is not one of float32, bfloat16, float16."
    )


def test_all_loss_weights_zero(tmp_path: Path) -> None:
    assert _fails(tiny(tmp_path, "loss.kd_weight=0", "loss.hidden_weight=0")).startswith(
        "loss.kd_weight, loss.hidden_weight and loss.lm_weight are all 0"
    )


def test_global_batch_not_divisible_by_world_size(tmp_path: Path) -> None:
    cfg = tiny(
        tmp_path,
        "global_batch_size=5",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp_spawn",
    )
    assert _fails(cfg) == (
        "global_batch_size=5 is not divisible by the world size 2 x "
        "trainer.accumulate_grad_batches=1 = 2; use a multiple of 2."
    )


def test_warm_heap_must_be_a_boolean(tmp_path: Path) -> None:
    assert _fails(tiny(tmp_path, "warm_heap=1")) == "warm_heap=1 must be true or false."


def test_global_batch_sets_the_per_device_batch() -> None:
    assert per_device_batch(128, world_size=8, accumulate=4) == 4
    with pytest.raises(OneBitInputError, match="not divisible"):
        per_device_batch(6, world_size=4, accumulate=1)


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny(tmp, "trainer.max_steps=2", "callbacks.resume.every_n_train_steps=2", "export=false")
    assert cli(cfg)[0] == 0
    return tmp / "out" / "checkpoints" / "step00000002.ckpt"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=tiny_opt", "is for another architecture (model 'tiny_llama', this run's is "),
        ("model=tiny_qwen2", "is for another architecture (model 'tiny_llama', this run's is "),
        (
            "quant=onebit_official",
            "was trained with another quantization config (quant.ste='identity' there, 'tanh' "
            "here; quant.sign_of_zero='plus' there, 'zero' here; quant.output_norm=False there, "
            "True here; quant.output_gain=True there, False here; quant.outliers=256 there, 0 "
            "here)",
        ),
        (
            "quant.skip_modules=[model.layers.0.*]",
            "was trained with another quantization config (quant.skip_modules=[] there, "
            "['model.layers.0.*'] here)",
        ),
    ],
)
def test_checkpoint_of_another_model_or_quantization(
    tmp_path: Path, llama_checkpoint: Path, override: str, expected: str
) -> None:
    msg = _fails(tiny(tmp_path, override, f"ckpt_path={llama_checkpoint}"))
    assert msg.startswith(f"ckpt_path={llama_checkpoint} {expected}"), msg


def test_truncated_checkpoint_named(tmp_path: Path, llama_checkpoint: Path) -> None:
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(llama_checkpoint.read_bytes()[:5000])
    msg = _fails(tiny(tmp_path, f"ckpt_path={bad}"))
    assert msg.startswith(f"ckpt_path={bad} cannot be read as a checkpoint (")
    assert msg.endswith("there is no good checkpoint beside it.")


def test_evaluate_refuses_a_corrupt_checkpoint(
    tmp_path: Path, llama_checkpoint: Path, capsys
) -> None:
    bad = tmp_path / "flipped.ckpt"
    data = bytearray(llama_checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    (tmp_path / "flipped.ckpt.meta.json").write_bytes(
        (llama_checkpoint.parent / (llama_checkpoint.name + ".meta.json")).read_bytes()
    )
    import importlib.util

    from omegaconf import OmegaConf

    from onebit.errors import run_cli

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = OmegaConf.create({"source": "checkpoint", "path": str(bad), "dtype": "float32"})
    with pytest.raises(SystemExit) as e:
        run_cli(script.load_for_eval, cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint {bad} is corrupt (its CRC-32 differs from when written)."
    )


# -- packed exports --------------------------------------------------------------------------------
@pytest.fixture
def export(tmp_path: Path) -> Path:
    from onebit.export import save_onebit
    from onebit.models import tiny_causal_lm
    from onebit.quant import OneBitConfig, freeze_, quantize_

    student = freeze_(quantize_(tiny_causal_lm("llama"), OneBitConfig()))
    return save_onebit(student, tmp_path / "export", OneBitConfig(), dtype=torch.float32)


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        (  # tiled (format 2): ceil(64 / 16) tiles of ceil(32 / 32) words
            "model.layers.0.mlp.up_proj.packed_signs",
            (4, 2, 16, 4),
            "the architecture needs (4, 1, 16, 4).",
        ),
        ("model.layers.1.self_attn.q_proj.in_scale", (31,), "the architecture needs (32,)."),
        ("model.norm.weight", (16,), "the architecture needs (32,)."),
    ],
)
def test_packed_export_with_wrong_shapes(export: Path, key: str, shape, expected: str) -> None:
    from safetensors.torch import load_file, save_file

    from onebit.export import load_onebit

    state = load_file(export / "model.safetensors")
    state[key] = torch.zeros(shape, dtype=state[key].dtype)
    save_file(state, export / "model.safetensors")
    with pytest.raises(OneBitInputError, match="does not match the checksum"):
        load_onebit(export)  # a changed file fails its checksum first
    with pytest.raises(OneBitInputError) as e:  # the shapes are checked without it too
        load_onebit(export, verify=False)
    assert str(e.value).endswith(f"{expected}") and key in str(e.value)


def test_truncated_export_is_named(export: Path) -> None:
    from onebit.export import load_onebit

    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(OneBitInputError, match="does not match the checksum"):
        load_onebit(export)
    with pytest.raises(OneBitInputError) as e:
        load_onebit(export, verify=False)
    assert str(e.value).startswith(f"{export}/model.safetensors is truncated or corrupt (")
    assert str(e.value).endswith("export the model again.")


# -- disk full -------------------------------------------------------------------------------------
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous(tmp_path: Path) -> None:
    from onebit.checkpoint import check_checkpoint

    cfg = tiny(
        tmp_path,
        "trainer.max_steps=6",
        "callbacks.resume.every_n_train_steps=2",
        "+callbacks.full._target_=tests.reliability.faults.DiskFullDuringSave",
        "+callbacks.full.at_step=4",
    )
    code, line, _ = cli(cfg)
    assert code == 3, line
    assert_one_sentence(line)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert line == (
        f"error: could not write checkpoint {ckpts / 'step00000004.ckpt'} (the disk is full); "
        "nothing was replaced (no earlier checkpoint of that name existed, and the other "
        "checkpoints in that directory are untouched): free space and resume with ckpt_path=auto."
    )
    assert check_checkpoint(ckpts / "step00000002.ckpt").global_step == 2
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # no temporary file left
    assert not (Path(cfg.paths.output_dir) / "result.json").exists()


def test_disk_full_while_exporting_keeps_the_previous_export(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny(tmp_path, "trainer.max_steps=2")
    assert cli(cfg)[0] == 0
    export = Path(cfg.paths.output_dir) / "onebit_model"
    before = (export / "model.safetensors").read_bytes()

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("safetensors.torch.save_file", full)
    code, line, _ = cli(tiny(tmp_path, "trainer.max_steps=2", "ckpt_path=auto"))
    assert code == 3, line
    assert line == (
        f"error: could not export the 1-bit model to {export} (the disk is full); nothing was "
        "replaced (the previous export there is intact) and the checkpoints are complete: free "
        f"space and rerun with ckpt_path=auto hydra.run.dir={export.parent} to export again."
    )
    assert (export / "model.safetensors").read_bytes() == before
    left = [p.name for p in export.parent.iterdir() if p.name.startswith(".")]
    assert left == [".hydra"]  # the run's saved config; no temporary export left
