"""Checks that run before anything heavy or anything written: bad input fails in seconds.

``train.py`` calls :func:`check_command_line` before Hydra composes (and saves) the config, then
the others on the composed config before it loads a model, generates data or opens a logger. Each
failure is a :class:`~onebit.errors.OneBitInputError` of one sentence naming the key or path.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onebit.errors import OneBitInputError, first_line
from onebit.models import context_length

# a config key that holds a credential: api_key, token, hf_token, secret, password, ...
SECRET_KEY = re.compile(r"(^|_)(api_key|apikey|token|secret|password)$", re.IGNORECASE)
# a Hugging Face access token pasted as a value
HF_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
# quantization options that change what the student computes; the others only set its start
# (svid_*, latent_init*), which a checkpoint supersedes, or how it is computed (fused)
QUANT_SEMANTICS = (
    "ste", "sign_of_zero", "output_norm", "output_gain", "norm_eps", "skip_modules", "outliers"
)  # fmt: skip


# -- the command line, before Hydra -------------------------------------------------------------
def config_groups(conf_dir: Path) -> dict[str, list[str]]:
    """``{group: [options]}`` of a Hydra config directory (``hydra/launcher`` for nested ones)."""
    groups: dict[str, list[str]] = {}
    for d in sorted(p for p in conf_dir.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in d.glob("*.yaml"))
        if options:
            groups[d.relative_to(conf_dir).as_posix()] = options
    return groups


def check_command_line(argv: Sequence[str], conf_dir: Path) -> None:
    """Refuse an unknown option of a config group, and a secret passed as an override.

    Hydra's own message for an unknown option spans a dozen lines; a secret on the command line
    would be saved by Hydra in ``.hydra/`` and by W&B with the run, so it is refused before either
    sees it (the message names the key, never the value).

    Raises:
        OneBitInputError: naming the override and the valid options.
    """
    groups = config_groups(conf_dir)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.split("@", 1)[0] in groups and not key.startswith("hydra/"):
            group = key.split("@", 1)[0]
            if "(" in value or value.strip() in ("", "null"):  # sweep functions, deletion
                continue
            for option in value.split(","):
                option = option.strip().strip("'\"")
                if option not in groups[group]:
                    raise OneBitInputError(
                        f"{group}={option} is not an option of the {group} group; valid: "
                        f"{', '.join(groups[group])}."
                    )
        last = key.rsplit(".", 1)[-1]
        if (SECRET_KEY.search(last) and value.strip() not in ("", "null")) or HF_TOKEN_VALUE.search(
            value
        ):
            raise OneBitInputError(
                f"the override {key}=... puts a secret on the command line, where Hydra would save "
                "it to .hydra/ and W&B to its run; set it in the environment instead "
                "(WANDB_API_KEY, HF_TOKEN)."
            )


def _hydra_reason(e: BaseException) -> str:
    """The first line of a Hydra/OmegaConf error, or of the error under it."""
    for err in (e, e.__cause__):
        if err is not None and str(err).strip():
            return str(err).strip().splitlines()[0].rstrip(".")
    return type(e).__name__


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is OmegaConf's ``???`` (required, unset) in a plain container."""
    if isinstance(node, Mapping):
        items = node.items()
    elif isinstance(node, list):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return [prefix] if node == "???" else []
    return [k for key, v in items for k in _missing_keys(v, f"{prefix}.{key}" if prefix else key)]


RENAMED = {"loss.alpha": "loss.hidden_weight", "loss.kd_scale": "loss.kd_weight"}


def check_composes(argv: Sequence[str], conf_dir: Path, config_name: str) -> None:
    """Compose the config as Hydra will, and say in one sentence what stops it: a key that is not
    in the config (a typo: ``optim.lrr=1``), a value of the wrong type, or a required value left
    unset (``model=local`` without ``model.path``). Sweeps (``-m``) are left to Hydra.

    Raises:
        OneBitInputError: naming the key.
    """
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from onebit.config_utils import register_resolvers

    register_resolvers()
    overrides = [a for a in argv if "=" in a or a.startswith("~")]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        text = f"{e} {e.__cause__ or ''}"
        m = re.search(r"Could not override '([^']+)'", text)
        if m and "not in struct" in text:
            key = m.group(1)
            if key in RENAMED:
                raise OneBitInputError(f"{key} is now called {RENAMED[key]}.") from None
            raise OneBitInputError(
                f"{key} is not a key of the config; check its spelling (python "
                f"{config_name}.py --cfg job lists every key), or add a new key with +{key}=..."
            ) from None
        raise OneBitInputError(f"the command line does not compose: {_hydra_reason(e)}.") from None
    plain = OmegaConf.to_container(cfg, resolve=False)  # interpolations stay text, ??? too
    missing = sorted(k for k in _missing_keys(plain) if not k.startswith("hydra."))
    if missing:
        raise OneBitInputError(
            f"{missing[0]} must be set (it has no default here): add {missing[0]}=... to the "
            "command line."
        )


def exit_on_bad_command_line(
    conf_dir: Path, argv: Sequence[str] | None = None, config_name: str | None = None
) -> None:
    """:func:`check_command_line` (and :func:`check_composes` with ``config_name``) for a
    script's ``__main__``: one sentence and exit status 2."""
    from onebit.errors import EXIT_INPUT

    argv = sys.argv[1:] if argv is None else argv
    try:
        check_command_line(argv, conf_dir)
        if config_name:
            check_composes(argv, conf_dir, config_name)
    except OneBitInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT)


def find_secrets(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that hold a credential (a non-empty secret-named key)."""
    found = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping | list):
                found += find_secrets(v, key)
            elif (SECRET_KEY.search(str(k)) and v not in (None, "")) or (
                isinstance(v, str) and HF_TOKEN_VALUE.search(v)
            ):
                found.append(key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_secrets(v, f"{prefix}[{i}]")
    return found


def check_no_secrets(config: Mapping[str, Any]) -> None:
    """Refuse a config that carries a credential (it would reach the logs and W&B)."""
    keys = find_secrets(config)
    if keys:
        raise OneBitInputError(
            f"the config holds a secret at {', '.join(keys)}; remove it and set it in the "
            "environment instead (WANDB_API_KEY, HF_TOKEN), so that it is never written to logs."
        )


# -- the model ------------------------------------------------------------------------------------
def check_seq_len(seq_len: int | None, model_name: str, config) -> None:
    """Refuse training sequences longer than the model's context."""
    ctx = context_length(config)
    if isinstance(seq_len, int) and ctx is not None and seq_len > ctx:
        raise OneBitInputError(
            f"data.seq_len={seq_len} is above the context of model {model_name} ({ctx} "
            "positions); lower data.seq_len."
        )


def check_loss_weights(loss) -> None:
    """Refuse a loss whose every term has weight 0 (negative and NaN weights: the config does)."""
    if loss.kd_weight == 0 and loss.hidden_weight == 0 and loss.lm_weight == 0:
        raise OneBitInputError(
            "loss.kd_weight, loss.hidden_weight and loss.lm_weight are all 0, so the loss is "
            "constant; set at least one above 0."
        )


def per_device_batch(global_batch_size: int, world_size: int, accumulate: int) -> int:
    """Sequences per device and micro-batch for ``global_batch_size`` sequences per step.

    Raises:
        OneBitInputError: ``global_batch_size`` is not a multiple of world size × accumulation.
    """
    if not isinstance(global_batch_size, int) or isinstance(global_batch_size, bool):
        raise OneBitInputError(f"global_batch_size={global_batch_size!r} must be an integer.")
    per_step = world_size * accumulate
    if global_batch_size < 1 or global_batch_size % per_step:
        raise OneBitInputError(
            f"global_batch_size={global_batch_size} is not divisible by the world size "
            f"{world_size} x trainer.accumulate_grad_batches={accumulate} = {per_step}; use a "
            f"multiple of {per_step}."
        )
    return global_batch_size // per_step


# -- resuming -------------------------------------------------------------------------------------
def student_shapes(config, quant, trust_remote_code: bool = False) -> dict[str, tuple]:
    """``{key: shape}`` of the LightningModule's state dict for this model and quantization,
    computed on the ``meta`` device (no memory, no SVID)."""

    import torch
    from transformers import AutoModelForCausalLM

    from onebit.quant import quantize_

    with torch.device("meta"):
        kw = {"trust_remote_code": True} if trust_remote_code else {}
        model = AutoModelForCausalLM.from_config(config, **kw)
    quantize_(model, quant.without_calibration())
    return {f"student.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint_fits(path: Path, spec, config, quant) -> None:
    """Refuse, before any model is loaded, a checkpoint of another architecture or quantization.

    Reads the checkpoint memory-mapped (``weights_only``): its hyper-parameters and tensor shapes.
    """
    import torch

    from onebit.checkpoint import sharded_hyper_parameters, sharded_shapes
    from onebit.train.module import state_mismatch

    try:
        if Path(path).is_dir():  # sharded (FSDP2): its metadata, no tensor is read
            ckpt = sharded_hyper_parameters(Path(path))
            ckpt["state_dict"] = sharded_shapes(Path(path))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise OneBitInputError(f"ckpt_path={path} cannot be read: {first_line(e)}") from e
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not hp or "quant" not in hp or "model" not in hp or "state_dict" not in ckpt:
        raise OneBitInputError(f"ckpt_path={path} is not a checkpoint written by train.py.")
    theirs, ours = hp["quant"], quant.to_dict()
    diffs = [
        f"quant.{k}={theirs.get(k)!r} there, {ours[k]!r} here"
        for k in QUANT_SEMANTICS
        if k in theirs and _norm(theirs[k]) != _norm(ours[k])
    ]
    if diffs:
        raise OneBitInputError(
            f"ckpt_path={path} was trained with another quantization config ({'; '.join(diffs)}); "
            "resume with the same quant settings or start a new run."
        )
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in ckpt["state_dict"].items()}
    diff = state_mismatch(student_shapes(config, quant, spec.trust_remote_code), shapes)
    if diff:
        raise OneBitInputError(
            f"ckpt_path={path} is for another architecture (model "
            f"{hp['model'].get('name')!r}, this run's is {spec.name!r}): {diff}."
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


# -- the run: every check before anything is loaded or written ---------------------------------
def preflight_run(cfg, module, datamodule, world_size: int) -> Path | None:
    """Every check that needs no weights, before anything is loaded or written; returns the
    checkpoint to resume from (``ckpt_path``: none, ``auto``, a directory or a file)."""
    from omegaconf import OmegaConf

    from onebit.checkpoint import resolve_ckpt_path
    from onebit.config_utils import torch_dtype
    from onebit.export import check_export_destination
    from onebit.models import model_config
    from onebit.train.rundir import check_fresh_run_dir, launch_rank

    check_no_secrets(OmegaConf.to_container(cfg, resolve=True))
    check_loss_weights(module.loss_config)
    hf_config = model_config(module.spec)  # a missing, offline or remote-code model fails here
    if hasattr(datamodule, "preflight"):  # offline, missing, empty or too short data
        datamodule.preflight(world_size)
    check_seq_len(getattr(datamodule, "seq_len", None), module.spec.name, hf_config)
    out_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir / "checkpoints")
    if ckpt is not None:
        check_checkpoint_fits(ckpt, module.spec, hf_config, module.quant)
    elif launch_rank() == 0:  # a new run never overwrites a finished or interrupted one
        check_fresh_run_dir(out_dir)
    if cfg.get("export"):  # the end-of-run export may replace an earlier export, nothing else
        torch_dtype("export_dtype", cfg.export_dtype)
        check_export_destination(out_dir / "onebit_model")
    return ckpt
