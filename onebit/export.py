"""The exported 1-bit model: a directory ``load_onebit`` rebuilds without dense weight matrices.

Layout:
    config.json        the base architecture's Hugging Face config, plus an ``onebit`` block: format
                       version, the quantization config, the quantized module names, the sign
                       convention and bit order, and the dtype of the value vectors.
    model.safetensors  packed signs (uint8, 8 per byte), g (``in_scale``), h (``out_scale``),
                       output gains (``out_gain``, when trained with ``output_gain``), biases,
                       and the full-precision embeddings, norms and ``lm_head``; tied tensors once.
    tokenizer files    when a tokenizer is given.

The directory is written next to its destination and renamed into place, so an interrupted export
never replaces a good one with half a model. An existing destination is replaced only when it is
empty or a previous OneBit export (its config.json has the ``onebit`` block); any other folder is
refused and left as it was. config.json records the SHA-256 of model.safetensors, which
``load_onebit`` checks, and the files get the permissions of the umask (as ``open`` would).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from onebit.errors import OneBitInputError, first_line
from onebit.hf import SIGN_CONVENTION, base_model_type, quantization_config, register_model_type
from onebit.quant import OneBitConfig, OneBitLinear, PackedOneBitLinear, quantize_
from onebit.quant.convert import _set_submodule, linear_shape
from onebit.quant.packing import BIT_ORDER, FORMAT_VERSION, READ_FORMATS, tiled_shape

WEIGHTS = "model.safetensors"


def _packed_state(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list]:
    """State dict of ``model`` with every OneBitLinear packed, floats cast to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    names = []
    seen: dict[int, str] = {}
    packed_prefixes = set()
    for name, module in model.named_modules():
        if isinstance(module, OneBitLinear | PackedOneBitLinear):
            names.append(name)
            p = (
                module
                if isinstance(module, PackedOneBitLinear)
                else PackedOneBitLinear.from_onebit(module)
            )
            for key, t in p.state_dict().items():
                state[f"{name}.{key}"] = t.to(dtype) if t.is_floating_point() else t
            packed_prefixes.add(name + ".")
    for key, t in model.state_dict(keep_vars=False).items():
        if any(key.startswith(p) for p in packed_prefixes):
            continue
        if t.data_ptr() in seen and t.data_ptr() != 0:  # tied (e.g. embeddings and lm_head)
            continue
        seen[t.data_ptr()] = key
        state[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return state, names


def is_onebit_export(path: Path) -> bool:
    """Whether ``path`` is a directory that :func:`save_onebit` wrote (config.json with the
    ``onebit`` block)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("onebit"), dict)


def check_export_destination(path: str | os.PathLike) -> None:
    """Refuse to write an export over anything but an empty folder or an earlier OneBit export.

    Raises:
        OneBitInputError: ``path`` is a file, or a non-empty folder that is not a OneBit export.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise OneBitInputError(
            f"the export destination {path} exists and is not a folder; nothing was written: "
            "give a new folder."
        )
    if any(path.iterdir()) and not is_onebit_export(path):
        raise OneBitInputError(
            f"the export destination {path} is a non-empty folder that is not a OneBit export; "
            "nothing was written or deleted: give a new or empty folder (an earlier export is "
            "replaced, nothing else is)."
        )


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _os_error(e: Exception, path: Path) -> OSError:
    """A safetensors write error as the OSError it reports (``... (os error 28)``)."""
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _apply_umask(root: Path) -> None:
    """``mkdtemp`` makes the folder 0700: give it and its files what ``open``/``mkdir`` give."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def model_card(
    model: nn.Module, quant: OneBitConfig, names: list[str], card: dict[str, Any] | None = None
) -> str:
    """The export's README.md: what the model is, its size, the recipe, the evaluation when one
    was run (``card["metrics"]``), the command that made it (``card["command"]``) and how to load,
    evaluate and share it."""
    from onebit.quant.footprint import footprint, human_bytes

    card = card or {}
    config = getattr(model, "config", None)
    base = card.get("base") or getattr(config, "_name_or_path", "") or type(model).__name__
    arch = base_model_type(str(getattr(config, "model_type", "?")))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [onebit, 1-bit, quantization, knowledge-distillation]",
        "---",
        "",
        f"# {Path(str(base)).name or base}: OneBit 1-bit student",
        "",
        f"The {len(names)} linear layers of the decoder blocks of `{base}` ({arch}) hold 1-bit "
        "weights (OneBit, Xu et al., NeurIPS 2024, arXiv 2402.11295): "
        "`Y = [(X ⊙ g) · sign(W)ᵀ] ⊙ h` with the layer options below, the signs packed 8 per "
        "byte; embeddings, norms and `lm_head` are full precision.",
        "",
    ]
    try:
        report = footprint(model)
    except Exception:  # a model footprint cannot read: the card goes without the size table
        report = None
    if report is not None and report.quantized_weights:
        lines += [
            "## Size",
            "",
            "| | |",
            "|---|---:|",
            f"| bits per quantized weight | {report.bits_per_weight:.4f} |",
            f"| bits per weight, whole model | {report.model_bits_per_weight:.4f} |",
            f"| FP16 size | {human_bytes(report.fp16_bytes)} |",
            f"| 1-bit size | {human_bytes(report.onebit_bytes)} |",
            "",
        ]
    options = ", ".join(f"`{k}={v}`" for k, v in sorted(quant.to_dict().items()))
    lines += ["## Recipe", "", f"Layer options: {options}.", ""]
    if card.get("command"):
        lines += ["Made by:", "", "```bash", str(card["command"]), "```", ""]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---:|"]
        lines += [f"| `{k}` | {float(v):.4g} |" for k, v in sorted(metrics.items())]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "import onebit  # the onebit package: registers the 1-bit layers with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
        "```",
        "",
        "```bash",
        "python -m onebit.lm_eval run --model hf --model_args "
        "pretrained=<this folder or repo>,backend=causal --tasks piqa",
        "```",
        "",
        "`model.push_to_hub(...)` shares it in the same format. Without `onebit`, transformers "
        f"refuses it (model type `onebit_{arch}` is not one it knows) rather than building dense "
        "layers with random weights.",
        "",
    ]
    return "\n".join(lines)


def save_onebit(
    model: nn.Module,
    path: str | os.PathLike,
    quant: OneBitConfig,
    dtype: torch.dtype = torch.float16,
    tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Export a OneBit student (OneBitLinear or already packed layers) as a 1-bit model directory.

    Args:
        model: the student, a Hugging Face causal LM whose decoder-block linears are OneBit layers.
        path: the directory to create; an existing one is replaced atomically when it is empty or
            an earlier export (:func:`check_export_destination`), else refused.
        quant: the quantization config the student was trained with.
        dtype: dtype of the value vectors and the full-precision parts.
        tokenizer: saved alongside when given.
        extra: more metadata for the ``onebit`` block of config.json.
        card: for the model card (README.md): ``base`` (the teacher's name), ``command`` (what
            made the model), ``metrics`` (name → value, the evaluation table).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    check_export_destination(path)
    state, names = _packed_state(model, dtype)
    if not names:
        raise OneBitInputError("the model has no OneBit layers to export; quantize it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        try:
            save_file(
                state, tmp / WEIGHTS, metadata={"format": "pt", "onebit": str(FORMAT_VERSION)}
            )
        except SafetensorError as e:  # a full disk comes back as this, not as OSError
            raise _os_error(e, path / WEIGHTS) from e
        model.config.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        value_dtype = str(dtype).removeprefix("torch.")
        cfg["onebit"] = {
            "format_version": FORMAT_VERSION,
            "quant": quant.to_dict(),
            "modules": names,
            "sign_convention": SIGN_CONVENTION,
            "bit_order": BIT_ORDER,
            "value_dtype": value_dtype,
            "weights_sha256": file_sha256(tmp / WEIGHTS),
            **(extra or {}),
        }
        # transformers: a model type of its own (refused where onebit is not installed) and a
        # standard quantization_config (onebit.hf's quantizer builds the packed layers)
        cfg["model_type"] = register_model_type(base_model_type(cfg["model_type"]))
        cfg["architectures"] = [
            "OneBit" + a.removeprefix("OneBit") for a in cfg.get("architectures") or []
        ] or [f"OneBit{type(model).__name__}".replace("OneBitOneBit", "OneBit")]
        cfg["quantization_config"] = quantization_config(names, quant.to_dict(), value_dtype)
        cfg["dtype"] = value_dtype  # from_pretrained without dtype= keeps the saved precision
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model, quant, names, card))
        _apply_umask(tmp)
        check_export_destination(path)  # again: nothing else may have appeared there meanwhile
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_onebit(
    path: str | os.PathLike, dtype: torch.dtype | None = None, verify: bool = True
) -> nn.Module:
    """Rebuild an exported 1-bit model with :class:`PackedOneBitLinear` layers, in eval mode.

    No dense weight matrix is ever materialised: the architecture is built with parameters on the
    ``meta`` device and the saved tensors are assigned in place.

    Args:
        path: a directory written by :func:`save_onebit`.
        dtype: cast the floating-point tensors to this dtype (default: as saved).
        verify: check model.safetensors against the SHA-256 in config.json (exports written
            before the checksum have none and are not checked).
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise OneBitInputError(f"{path} is not a OneBit export (needs config.json and {WEIGHTS}).")
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise OneBitInputError(f"{path}/config.json is not valid JSON ({e}).") from None
    info = raw.get("onebit") if isinstance(raw, dict) else None
    if not info:
        raise OneBitInputError(f"{path}/config.json has no 'onebit' block: not a OneBit export.")
    version = info.get("format_version")
    if version not in READ_FORMATS:
        raise OneBitInputError(
            f"{path} has OneBit format version {version}, this code reads "
            f"{' and '.join(map(str, READ_FORMATS))}."
        )
    quant = OneBitConfig.from_dict(info["quant"])
    want = info.get("weights_sha256")
    if verify and want and file_sha256(path / WEIGHTS) != want:
        raise OneBitInputError(
            f"{path}/{WEIGHTS} does not match the checksum in its config.json (the file changed "
            "or was damaged after the export); export the model again."
        )
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type != base_model_type(model_type):
        register_model_type(base_model_type(model_type))  # onebit_<base> of any architecture
    try:  # trust_remote_code stays off: an export never runs code shipped beside it
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise OneBitInputError(f"{path}/config.json is not a usable model config: {first}") from e
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(config)
    try:  # safetensors: tensors only, nothing executed
        state = load_file(path / WEIGHTS)
    except Exception as e:
        first = first_line(e)
        raise OneBitInputError(
            f"{path}/{WEIGHTS} is truncated or corrupt ({first}); export the model again."
        ) from e
    for name in info["modules"]:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise OneBitInputError(f"{path}: module {name} is not in the architecture.") from None
        out_f, in_f = linear_shape(old)
        packed = state.get(f"{name}.packed_signs")
        # format 1: row-major (tiled by PackedOneBitLinear as it loads); 2: the tiles themselves
        expected = (out_f, (in_f + 7) // 8) if version == 1 else tiled_shape(out_f, in_f)
        if packed is None or tuple(packed.shape) != expected:
            got = None if packed is None else tuple(packed.shape)
            raise OneBitInputError(
                f"{path}: {name}.packed_signs has shape {got}, the architecture needs {expected}."
            )
        new = PackedOneBitLinear(
            in_f,
            out_f,
            bias=f"{name}.bias" in state,
            output_norm=quant.output_norm,
            norm_eps=quant.norm_eps,
            device="meta",
            out_gain=f"{name}.out_gain" in state,
            outliers=int(state[f"{name}.outlier_value"].numel())
            if f"{name}.outlier_value" in state
            else 0,
        )
        _set_submodule(model, name, new)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for key, t in state.items():
        if version == 1 and key.endswith(".packed_signs"):
            continue  # row-major, checked above
        if key in expected and tuple(t.shape) != expected[key]:
            raise OneBitInputError(
                f"{path}: {key} has shape {tuple(t.shape)}, the architecture needs {expected[key]}."
            )
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise OneBitInputError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise OneBitInputError(f"{path}: tensors missing from {WEIGHTS}: {still_meta[:5]}.")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def student_from_state(
    config, quant: OneBitConfig, state: dict[str, Tensor], dtype: torch.dtype
) -> nn.Module:
    """A plain CPU student of architecture ``config`` holding ``state`` (a full student state
    dict, keys without the ``student.`` prefix), built without weights of its own: parameters
    are created empty (``meta``) and ``state``'s tensors assigned; no SVID runs."""

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantize_(model, quant.without_calibration())
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty or unexpected:
        raise OneBitInputError(
            f"the student state does not fit the {type(model).__name__} architecture: "
            f"{len(empty)} parameter(s) missing (e.g. {empty[:1]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:1]})."
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.requires_grad_(False).eval()
