"""Configuration of the OneBit layer and its initialisation.

Every behaviour of the paper's official code that we change is a named option here, and
:meth:`OneBitConfig.official` reproduces the official code (xuyuzhuang11/OneBit) exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from onebit.config_utils import check_choice, check_int, check_number, from_mapping
from onebit.errors import OneBitInputError

SvidMethod = Literal["nmf", "svd", "nmf_sklearn", "none"]
LatentInit = Literal["sign", "weight"]
SteKind = Literal["identity", "clipped", "tanh"]
SignOfZero = Literal["plus", "zero"]
GainInit = Literal["ones", "rms", "ls"]
SignInit = Literal["sign", "gptq"]

SVID_METHODS = ("nmf", "svd", "nmf_sklearn", "none")
LATENT_INITS = ("sign", "weight")
STE_KINDS = ("identity", "clipped", "tanh")
SIGNS_OF_ZERO = ("plus", "zero")
GAIN_INITS = ("ones", "rms", "ls")
SIGN_INITS = ("sign", "gptq")


@dataclass
class OneBitConfig:
    """How linear layers become :class:`~onebit.quant.OneBitLinear` and how they start.

    Attributes:
        svid_method: rank-1 decomposition of ``|W|`` that initialises the value vectors
            (``nmf``: the paper's recommendation, which for rank 1 on a non-negative matrix is
            power iteration and reaches the optimum; ``svd``: exact ``torch.linalg.svd``;
            ``nmf_sklearn``: the official code's scikit-learn NMF;
            ``none``: ``g = h = 1``, i.e. a plain copy of ``W``).
        svid_max_iter: iteration cap of the iterative methods (``nmf``, ``nmf_sklearn``).
        svid_tol: the iterative torch methods stop after a round that moves the unit vector
            ``b/||b||`` by at most this much (``onebit.quant.svid``).
        latent_init: the latent full-precision weight starts as ``sign(W) * latent_init_scale``
            (``sign``, official) or as ``W`` itself (``weight``).
        latent_init_scale: magnitude of the latent weight for ``latent_init="sign"``
            (official: 0.01).
        ste: straight-through estimator of ``sign``: ``identity`` (gradient passes unchanged),
            ``clipped`` (zero where ``|w| > 1``) or ``tanh``
            (official: ``grad * (1.001 - tanh(w)²)``).
        sign_of_zero: ``plus`` maps ``w == 0`` to +1 in training *and* when packed (default);
            ``zero`` reproduces the official ``torch.sign`` (0 in training, +1 once packed).
        output_norm: the parameter-free LayerNorm on the layer's output (the paper's design).
        output_gain: a learnable per-channel gain γ after that LayerNorm,
            ``y = γ ⊙ LN(...) + bias``, so that a layer can write its teacher's output scale (the
            LayerNorm alone fixes every token's RMS at 1); 1 at initialisation, or set from
            calibration data by :func:`onebit.quant.calibrate_output_gains_`. Not in the paper.
        gain_init: how ``output_gain`` starts: ``ones``, or calibrated from the teacher before
            training on ``calibration_sequences`` training sequences: ``rms`` (each channel gets
            its teacher's RMS) or ``ls`` (least squares per channel).
        sign_init: where the signs and value vectors start: ``sign`` (``sign(W)`` and SVID's
            ``a``, ``b``: the paper) or ``gptq`` (signs chosen by GPTQ's error feedback and ``g``,
            ``h`` refitted by least squares, both weighted by each layer's inputs on
            ``calibration_sequences`` training sequences: :mod:`onebit.quant.gptq`). Not in the
            paper.
        gptq_damp: ``sign_init=gptq``'s dampening, a fraction of each Gram matrix's mean diagonal.
        calibration_sequences: training sequences read by ``sign_init`` and ``gain_init``.
        outliers: per layer, the ``k`` weights where ``|W|`` most exceeds its rank-1 SVID
            approximation ``a bᵀ`` stay full precision on a sparse path beside the 1-bit one,
            added after the LayerNorm: ``y = γ ⊙ LN(...) + bias + W_K x`` (``W_K``: those ``k``
            entries of ``W``, learnable). These are the weights that write LLaMA-class "massive
            activations" (one weight of ~6 against a column mean of ~0.03 times an input of
            ~3,000), which neither a sign nor a rank-1 scale can hold. 0: off (the paper). Not
            in the paper.
        norm_eps: epsilon of that LayerNorm (``nn.LayerNorm``'s default, as in the official code).
        fused: use the fused autograd function, which saves only the input and the pre-scale
            output for backward (same numbers as the unfused composition).
        skip_modules: glob patterns of fully qualified module names that stay full precision.
        keep_massive: the ``k`` decoder-block linears whose teacher outputs on the calibration
            sequences most exceed what a OneBit layer with its LayerNorm can write (``max |y| >
            sqrt(out − 1)``: LLaMA-class "massive activations") also stay full precision; found
            before quantizing and added to ``skip_modules`` by name (so a trained run's config
            lists them). 0: off (the paper). Not in the paper.
    """

    svid_method: SvidMethod = "nmf"
    svid_max_iter: int = 200
    svid_tol: float = 1e-6
    latent_init: LatentInit = "sign"
    latent_init_scale: float = 0.01
    ste: SteKind = "identity"
    sign_of_zero: SignOfZero = "plus"
    output_norm: bool = True
    output_gain: bool = False
    gain_init: GainInit = "ones"
    sign_init: SignInit = "sign"
    gptq_damp: float = 0.01
    calibration_sequences: int = 8
    outliers: int = 0
    norm_eps: float = 1e-5
    fused: bool = True
    skip_modules: tuple[str, ...] = field(default_factory=tuple)
    keep_massive: int = 0

    def __post_init__(self) -> None:
        check_choice("quant", "svid_method", self.svid_method, SVID_METHODS)
        check_choice("quant", "latent_init", self.latent_init, LATENT_INITS)
        check_choice("quant", "ste", self.ste, STE_KINDS)
        check_choice("quant", "sign_of_zero", self.sign_of_zero, SIGNS_OF_ZERO)
        check_choice("quant", "gain_init", self.gain_init, GAIN_INITS)
        check_choice("quant", "sign_init", self.sign_init, SIGN_INITS)
        check_number("quant", "gptq_damp", self.gptq_damp, allow_zero=False)
        if not isinstance(self.calibration_sequences, int) or self.calibration_sequences < 1:
            raise OneBitInputError(
                f"quant.calibration_sequences={self.calibration_sequences!r} must be an integer "
                ">= 1."
            )
        check_int("quant", "outliers", self.outliers, 0)
        check_int("quant", "keep_massive", self.keep_massive, 0)
        if not isinstance(self.svid_max_iter, int) or self.svid_max_iter < 1:
            raise OneBitInputError(
                f"quant.svid_max_iter={self.svid_max_iter!r} must be an integer >= 1."
            )
        check_number("quant", "svid_tol", self.svid_tol)
        check_number("quant", "latent_init_scale", self.latent_init_scale, allow_zero=False)
        check_number("quant", "norm_eps", self.norm_eps, allow_zero=False)
        for key in ("output_norm", "output_gain"):
            if not isinstance(getattr(self, key), bool):
                raise OneBitInputError(f"quant.{key}={getattr(self, key)!r} must be true or false.")
        if self.gain_init != "ones" and not self.output_gain:
            raise OneBitInputError(
                f"quant.gain_init={self.gain_init} calibrates output gains, which need "
                "quant.output_gain=true."
            )
        self.skip_modules = tuple(self.skip_modules)

    @property
    def needs_calibration(self) -> bool:
        """Initialisation reads the teacher on training text (``sign_init``, ``gain_init``,
        ``keep_massive``)."""
        return (
            self.sign_init != "sign"
            or (self.output_gain and self.gain_init != "ones")
            or self.keep_massive > 0
        )

    def with_kept(self, names: list[str]) -> OneBitConfig:
        """This config with ``names`` (the layers ``keep_massive`` found) in ``skip_modules`` and
        ``keep_massive`` resolved to 0."""
        return dataclasses.replace(self, skip_modules=(*self.skip_modules, *names), keep_massive=0)

    def without_calibration(self) -> OneBitConfig:
        """This config for rebuilding a trained student (its values come from a state dict):
        no SVID, no calibration."""
        extra = {"gain_init": "ones"} if self.output_gain else {}
        if self.keep_massive:
            raise ValueError(
                f"quant.keep_massive={self.keep_massive} is unresolved: the kept layers are "
                "found on the teacher (OneBitConfig.with_kept) before a student is rebuilt."
            )
        return dataclasses.replace(self, svid_method="none", sign_init="sign", **extra)

    @classmethod
    def official(cls, **overrides: Any) -> OneBitConfig:
        """The official code: sklearn NMF, latent ``0.01·sign(W)``, tanh STE, ``torch.sign``."""
        base = dict(
            svid_method="nmf_sklearn",
            latent_init="sign",
            latent_init_scale=0.01,
            ste="tanh",
            sign_of_zero="zero",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OneBitConfig:
        """Build from a plain mapping (e.g. a Hydra node), naming any unknown key."""
        return from_mapping(cls, values, "quant")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skip_modules"] = list(self.skip_modules)
        return out
