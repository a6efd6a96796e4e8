"""The LightningModule: a frozen full-precision teacher and its OneBit student.

The student is built in ``configure_model`` (the teacher's structure, its decoder-block linears
swapped for SVID-initialised OneBit layers, everything else frozen and *shared* with the teacher,
so no second copy of embeddings, norms or ``lm_head`` is held), idempotently: Lightning may call
the hook more than once. The teacher is held beside the student, not as a child module, so it
never reaches the optimizer or a checkpoint; it stays in eval mode with gradients off.

Under ``trainer=fsdp`` (:class:`onebit.train.parallel.FSDP2Strategy`) the same hook then shards
student and teacher with FSDP2's ``fully_shard``, one unit per decoder block, with the mixed
precision of :class:`ParallelConfig` (bf16 compute, fp32 master weights and gradient reduction by
default).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from onebit.config_utils import from_mapping
from onebit.dist import full_tensor
from onebit.distill import BlockwiseConfig, DistillLoss, DistillLossConfig, blockwise_reconstruct_
from onebit.distill.losses import next_token_nll
from onebit.distill.recipe import OptimConfig, cosine_with_warmup, make_optimizer  # noqa: F401
from onebit.errors import OneBitInputError
from onebit.export import student_from_state
from onebit.models import DTYPES, ModelSpec, eager_attention, load_causal_lm
from onebit.quant import (
    OneBitConfig,
    OneBitLinear,
    footprint,
    freeze_,
    init_from_calibration_,
    massive_layer_names,
    quantize_,
)
from onebit.quant.convert import find_decoder_blocks
from onebit.quant.svid_cache import SvidCache, svid_cache_key
from onebit.train.guards import (
    GuardConfig,
    NonFiniteError,
    first_nonfinite,
    format_terms,
    is_finite,
    locate_nonfinite,
)

_DTYPES = DTYPES  # fsdp.param_dtype, fsdp.reduce_dtype: the same names as model.dtype


@dataclass
class ParallelConfig:
    """Memory options for large runs; the ``fsdp`` keys apply under ``trainer=fsdp``.

    Attributes:
        activation_checkpointing: recompute each decoder block's activations of the student in
            the backward pass instead of storing them (any strategy).
        param_dtype: FSDP2 compute dtype of gathered parameters (``bfloat16``, ``float16``,
            ``float32``; None: as stored). The sharded master weights stay fp32.
        reduce_dtype: FSDP2 dtype of the gradient reduce-scatter.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3
            style; False keeps them for the backward: faster, more memory).
        shard_teacher: shard the frozen teacher the same way (False: a full copy per rank).
    """

    activation_checkpointing: bool = False
    param_dtype: str | None = "bfloat16"
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True
    shard_teacher: bool = True

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in _DTYPES:
                raise OneBitInputError(
                    f"fsdp.{key}={value!r} is not one of {', '.join(_DTYPES)} or null."
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ParallelConfig:
        return from_mapping(cls, values, "fsdp")


def _attention_kind(model: nn.Module, forward_kwargs: dict[str, Any]):
    """Eager attention when ``forward_kwargs`` asks for the attention maps, else nothing."""
    return eager_attention(model) if forward_kwargs.get("output_attentions") else nullcontext()


def _as(cls, value):
    return value if isinstance(value, cls) or value is None else cls.from_dict(dict(value))


def _norm_of_norms(tensors: list[Tensor]) -> Tensor:
    # a sharded (DTensor) norm is reduced over ranks: every rank sees the global value
    return torch.linalg.vector_norm(
        torch.stack([full_tensor(torch.linalg.vector_norm(t)).float() for t in tensors])
    )


def state_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """How two ``{key: shape}`` maps differ, in a few words; None when they are the same."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return None
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensor(s) of another shape, e.g. {k} is {tuple(found[k])} there and "
            f"{tuple(expected[k])} here"
        )
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    return ", ".join(parts)


class OneBitDistillation(L.LightningModule):
    """Distil a full-precision teacher into its OneBit student.

    Args:
        model: the teacher (and so the student's architecture and full-precision parts).
        quant: OneBit layer and initialisation options.
        loss: distillation loss weights and reductions.
        optim: optimizer and schedule.
        guard: what to do on a NaN/inf loss or gradient (stop, or skip the step and count it).
        teacher: an already loaded teacher to use instead of loading ``model`` (tests, notebooks).
        parallel: activation checkpointing and the FSDP2 sharding options.
        blockwise: the block-wise reconstruction stage (``onebit.distill.blockwise``), run at the
            start of ``fit`` on the data module's first ``blockwise.sequences`` training
            sequences, before the first step; skipped when resuming from a checkpoint. With
            ``blockwise_state_path`` set (``train.py``: the run directory), a stage killed part
            way resumes from its last finished block.
        svid_cache_dir: where SVID results are cached (``onebit.quant.svid_cache``): computed
            once (by rank 0 in a distributed run, the other ranks wait and read them) and reused
            by later runs of the same model and SVID setting; None computes them every time.
    """

    def __init__(
        self,
        model: ModelSpec | dict[str, Any],
        quant: OneBitConfig | dict[str, Any] | None = None,
        loss: DistillLossConfig | dict[str, Any] | None = None,
        optim: OptimConfig | dict[str, Any] | None = None,
        guard: GuardConfig | dict[str, Any] | None = None,
        teacher: nn.Module | None = None,
        svid_cache_dir: str | None = None,
        parallel: ParallelConfig | dict[str, Any] | None = None,
        blockwise: BlockwiseConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.parallel = _as(ParallelConfig, parallel) or ParallelConfig()
        self.svid_cache_dir = svid_cache_dir
        self.spec = _as(ModelSpec, model)
        self.quant = _as(OneBitConfig, quant) or OneBitConfig()
        self.loss_config = _as(DistillLossConfig, loss) or DistillLossConfig()
        self.optim = _as(OptimConfig, optim) or OptimConfig()
        self.guard = _as(GuardConfig, guard) or GuardConfig()
        self.blockwise = _as(BlockwiseConfig, blockwise) or BlockwiseConfig()
        self.save_hyperparameters(
            {
                "model": self.spec.to_dict(),
                "quant": self.quant.to_dict(),
                "loss": asdict(self.loss_config),
                "optim": {**asdict(self.optim), "betas": list(self.optim.betas)},
                "blockwise": asdict(self.blockwise),
            }
        )
        self.loss_fn = DistillLoss(self.loss_config)
        self.student: nn.Module | None = None
        # a list keeps the teacher out of self._modules: no optimizer, no checkpoint, no .train()
        self._teacher: list[nn.Module] = [] if teacher is None else [teacher]
        self._step_start: float | None = None
        self._val_sums: dict[str, Tensor] = {}
        self.teacher_val_ppl: float | None = None
        self.nonfinite_skipped = 0  # steps dropped by guard.nonfinite=skip, over the whole run
        self._skips_in_a_row = 0
        self._skip_pending = False  # this optimizer step is dropped (guard.nonfinite=skip)
        self.calibration_ids: Tensor | None = None  # calibration text (else the data's)
        # quant.sign_init=gptq: per layer, the relative output error of SVID's start and of GPTQ's
        self.sign_init_errors: dict[str, dict[str, float]] = {}
        self.blockwise_state_path: str | None = None  # where a killed block-wise stage resumes
        self.blockwise_seed = 0
        self.blockwise_result: dict[str, Any] | None = None  # per-block errors, once it ran
        # configure_model's wall time: find the kept layers (quant.keep_massive), quantize (SVID
        # or its cache) and calibrate (sign_init, gain_init; 0 without them)
        self.setup_seconds: dict[str, float] = {}
        self.kept_massive: list[str] = []  # quant.keep_massive's layers, once configure_model ran

    # -- model set-up --------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        if not self._teacher:
            raise RuntimeError("the teacher is loaded in configure_model(); call it first.")
        return self._teacher[0]

    def configure_model(self) -> None:
        if self.student is not None:  # Lightning may call this more than once
            return
        if not self._teacher:
            self._teacher.append(load_causal_lm(self.spec))
        teacher = self.teacher.eval().requires_grad_(False)
        # the structure is copied, the tensors are not: the student's frozen parts are the
        # teacher's own, and its quantized linears get new weights below
        shared = {id(t): t for t in itertools.chain(teacher.parameters(), teacher.buffers())}
        student = copy.deepcopy(teacher, shared)
        if self.parallel.activation_checkpointing:
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            student.config.use_cache = False
            if self.loss_config.needs_attentions:  # backward's recomputation must match
                student.config._attn_implementation = "eager"
        mesh = getattr(self, "_device_mesh", None)
        shard = None if mesh is None else self._fully_shard(mesh["data_parallel"])
        # block by block: under FSDP2 each block is sharded as soon as it is quantized, so a
        # rank never holds the whole fp32 student, only the teacher and one student block.
        # Calibration (quant.sign_init, quant.gain_init) runs the whole student first, so then
        # every block is sharded after it (each rank calibrates on the same sequences)
        t_find = time.perf_counter()
        if self.quant.keep_massive:  # found on the teacher, then kept by name (also in hparams)
            self.kept_massive = massive_layer_names(
                teacher, self._calibration_ids(), self.quant.keep_massive
            )
            self.quant = self.quant.with_kept(self.kept_massive)
            self.hparams["quant"] = self.quant.to_dict()
        calibrate = self.quant.needs_calibration
        t0 = time.perf_counter()
        self._quantize(student, after_block=None if calibrate else shard)
        t1 = time.perf_counter()
        self.sign_init_errors = init_from_calibration_(
            teacher, student, self.quant, self._calibration_ids(), progress=True
        )
        self.setup_seconds = {
            "keep_massive": t0 - t_find,
            "quantize": t1 - t0,
            "calibrate": time.perf_counter() - t1,
        }
        student = freeze_(student).train()  # embeddings, norms, lm_head: full precision
        if shard is not None:
            if calibrate:
                for block in find_decoder_blocks(student)[1]:
                    shard(block)
            shard(student)
            if self.parallel.shard_teacher:
                _, blocks = find_decoder_blocks(teacher)
                for block in blocks:
                    shard(block)
                shard(teacher)
        self.student = student

    def _calibration_ids(self) -> Tensor | None:
        """Training sequences for calibration (``quant.sign_init``, ``quant.gain_init``):
        ``self.calibration_ids`` when set, else the data module's ``calibration_blocks``; None
        when not needed."""
        if not self.quant.needs_calibration:
            return None
        if self.calibration_ids is not None:
            return self.calibration_ids
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "calibration_blocks"):
            raise OneBitInputError(
                f"quant.sign_init={self.quant.sign_init}, quant.gain_init={self.quant.gain_init}: "
                "calibration needs training text to calibrate on: "
                "fit with a data module that has calibration_blocks (train.py's do)."
            )
        return dm.calibration_blocks(self.quant.calibration_sequences)

    @property
    def sharded(self) -> bool:
        """The student is sharded with FSDP2 (``trainer=fsdp``)."""
        return getattr(self, "_device_mesh", None) is not None and self.student is not None

    def _fully_shard(self, mesh):
        """FSDP2's ``fully_shard`` over ``mesh`` with this run's mixed precision, as a function
        of the module to shard (a decoder block, then the whole model: the rest)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        p = self.parallel
        policy = MixedPrecisionPolicy(
            param_dtype=_DTYPES.get(p.param_dtype), reduce_dtype=_DTYPES.get(p.reduce_dtype)
        )

        def shard(module: nn.Module) -> None:
            fully_shard(
                module, mesh=mesh, mp_policy=policy, reshard_after_forward=p.reshard_after_forward
            )

        return shard

    def _quantize(self, student: nn.Module, after_block=None) -> None:
        """``quantize_`` with the SVID cache when set (rank 0 computes and writes, the other
        ranks wait and read); ``after_block(block)`` runs on each block as soon as its linears
        are OneBit layers with fp32 master weights."""
        q = self.quant
        cache, dist, rank = None, False, 0
        if self.svid_cache_dir and q.svid_method != "none":
            key = svid_cache_key(
                json.dumps(self.spec.to_dict(), sort_keys=True), q.svid_method,
                q.svid_max_iter, q.svid_tol,
            )  # fmt: skip
            name = f"{self.spec.name}-{q.svid_method}-{key}.safetensors"
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            if dist and rank != 0:
                torch.distributed.barrier()  # rank 0 has written the cache
            cache = SvidCache(Path(self.svid_cache_dir) / name)

        def prepare(block: nn.Module) -> None:
            # trainable weights are fp32 masters, whatever the teacher's dtype
            for layer in block.modules():
                if isinstance(layer, OneBitLinear):
                    layer.float()
            freeze_(block)
            if after_block is not None:
                after_block(block)

        quantize_(student, q, progress=True, svid_cache=cache, after_block=prepare)
        if cache is not None:
            if rank == 0:
                cache.save()
                if dist:
                    torch.distributed.barrier()
            self.svid_cache_hits = cache.hits

    def _teacher_to_device(self) -> None:
        if not (self.sharded and self.parallel.shard_teacher):  # shards already live there
            self.teacher.to(self.device)

    def on_fit_start(self) -> None:
        self._teacher_to_device()
        self._blockwise_stage()

    def _blockwise_stage(self) -> None:
        """Block-wise reconstruction before the first step (``blockwise.steps > 0``), once."""
        b = self.blockwise
        if not b.steps or self.blockwise_result is not None:
            return
        if self.trainer.ckpt_path is not None:  # the checkpoint holds the stage's result
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "calibration_blocks"):
            raise OneBitInputError(
                "blockwise.steps>0 needs training text to reconstruct on: fit with a data module "
                "that has calibration_blocks (train.py's do)."
            )
        ids = dm.calibration_blocks(b.sequences, seq_len=dm.seq_len).to(self.device)
        path = self.blockwise_state_path
        if path is not None and self.sharded:  # each rank resumes its own shards
            path = f"{path}.rank{self.trainer.global_rank}"
        self.blockwise_result = blockwise_reconstruct_(
            self.teacher, self.student, ids, b, state_path=path,
            progress=self.trainer.is_global_zero, seed=self.blockwise_seed,
        )  # fmt: skip

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def plain_student(self) -> nn.Module | None:
        """The student as an ordinary module on CPU, for export and reports.

        Unsharded, that is the student itself. Sharded (FSDP2), its full state is gathered to rank
        0's CPU memory (a collective: every rank must call this) and loaded into a copy built
        without weights; other ranks get None.
        """
        if not self.sharded:
            return self.student
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.trainer.global_rank != 0:
            return None
        return self.student_from_state(state)

    def student_from_state(self, state: dict[str, Tensor]) -> nn.Module:
        """A plain CPU student holding ``state`` (a full student state dict)."""
        return student_from_state(self.teacher.config, self.quant, state, self.spec.torch_dtype)

    def footprint_report(self, student: nn.Module | None = None):
        """Bits and bytes of the student (``student`` when given: e.g. :meth:`plain_student`'s).
        A sharded student is counted on its architecture built on the ``meta`` device."""
        if student is None and self.sharded:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                student = AutoModelForCausalLM.from_config(copy.deepcopy(self.teacher.config))
        return footprint(student if student is not None else self.student, self.quant)

    # -- training -----------------------------------------------------------------------------
    def _forward_pair(self, batch: dict[str, Tensor]):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        kw = {"output_hidden_states": self.loss_config.needs_hidden_states}
        if self.loss_config.needs_attentions:  # loss.attention_weight: eager attention's maps
            kw["output_attentions"] = True
        with torch.no_grad(), _attention_kind(self.teacher, kw):
            t = self.teacher(input_ids=ids, attention_mask=mask, **kw)
        with _attention_kind(self.student, kw):
            s = self.student(input_ids=ids, attention_mask=mask, **kw)
        return s, t

    def _loss_terms(self, s, t, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.loss_fn(
            s.logits,
            t.logits,
            s.hidden_states,
            t.hidden_states,
            batch.get("attention_mask"),
            batch["input_ids"],
            getattr(s, "attentions", None),
            getattr(t, "attentions", None),
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        s, t = self._forward_pair(batch)
        terms = self._loss_terms(s, t, batch)
        if not self._finite_on_every_rank(terms["loss"]):
            self._nonfinite_loss(batch, terms)  # raises with guard.nonfinite=stop
            # a zero that reaches every trainable weight: backward runs on every rank as DDP
            # needs (Lightning refuses a None loss there); the step's update is dropped later
            return sum(p.sum() for p in self.student.parameters() if p.requires_grad) * 0.0
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=bs)
        for key in ("kd", "hidden", "attention", "lm"):
            if key in terms:
                self.log(f"train/loss_{key}", terms[key], batch_size=bs)
        return terms["loss"]

    # -- numerical guards (onebit.train.guards) ---------------------------------------------------
    def _finite_on_every_rank(self, loss: Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).float()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank must skip or none
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        return not bool(bad > 0)

    def _step_name(self) -> str:
        step = self.trainer.global_step
        return f"training step {step + 1} (global_step={step})"

    def _nonfinite_loss(self, batch: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if is_finite(terms["loss"]):
            where = "another rank's loss is NaN/inf, this rank's is finite"
        else:
            where = locate_nonfinite(
                self.student,
                self.teacher,
                lambda m: m(
                    input_ids=ids,
                    attention_mask=mask,
                    output_hidden_states=self.loss_config.needs_hidden_states,
                ),
            )
        self._skip_or_stop(
            f"non-finite loss at {self._step_name()}: {format_terms(terms)}; {where}"
        )

    def _skip_or_stop(self, what: str) -> None:
        if self.guard.nonfinite == "stop":
            raise NonFiniteError(f"{what}; guard.nonfinite=skip would skip such steps instead.")
        if self._skip_pending:  # another micro-batch of the same optimizer step
            return
        self._skip_pending = True
        self.nonfinite_skipped += 1
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.guard.max_consecutive_skips:
            raise NonFiniteError(
                f"{what}; that is {self._skips_in_a_row} skipped steps in a row, more than "
                f"guard.max_consecutive_skips={self.guard.max_consecutive_skips}."
            )
        if self.trainer.is_global_zero:
            warnings.warn(f"skipped: {what} ({self.nonfinite_skipped} so far).", stacklevel=2)

    def _grad_scaler_active(self) -> bool:
        # fp16 loss scaling skips overflowing steps itself while it calibrates the scale
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self._step_start is None:
            return
        dt = time.perf_counter() - self._step_start
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/tokens_per_s", tokens / max(dt, 1e-9), prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        with_grad = [(n, p) for n, p in self.student.named_parameters() if p.grad is not None]
        if not with_grad:
            self._skip_pending = False
            return
        # a NaN latent weight is invisible to the loss (sign(NaN) is a sign): check the weights
        # too; NaN/inf anywhere makes a norm non-finite
        weights = _norm_of_norms([p.detach() for _, p in with_grad])
        if not is_finite(weights):
            name = first_nonfinite((n, p.detach()) for n, p in with_grad)
            raise NonFiniteError(
                f"non-finite parameter at {self._step_name()}: {name} of the student holds NaN/inf "
                "while the loss and gradients are finite; skipping steps cannot repair a weight, "
                "so the run stops (resume from an earlier checkpoint)."
            )
        if not self._skip_pending:
            norm = _norm_of_norms([p.grad for _, p in with_grad])
            self.log("train/grad_norm", norm)
            # gradients are already reduced over ranks, so every rank takes the same decision
            if self._grad_scaler_active() or is_finite(norm):
                self._skips_in_a_row = 0
                return
            name = first_nonfinite((n, p.grad) for n, p in with_grad)
            self._skip_or_stop(
                f"non-finite gradient at {self._step_name()} in parameter {name} of the student "
                "(the loss was finite)"
            )
        for p in self.student.parameters():  # skip: no update, no optimizer-state change
            p.grad = None
        self._skip_pending = False

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["onebit"] = {"format_version": 1, "nonfinite_skipped": self.nonfinite_skipped}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # a sharded checkpoint loads in place (checked before)
            self.check_state_dict(checkpoint["state_dict"], "the checkpoint")
        self.nonfinite_skipped = int(checkpoint.get("onebit", {}).get("nonfinite_skipped", 0))

    def check_state_dict(self, state: dict[str, Tensor], what: str) -> None:
        """Refuse, in one sentence, a student state of another architecture or quantization.

        Raises:
            OneBitInputError: naming how ``state`` differs from this module's student.
        """
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        diff = state_mismatch(own, {k: tuple(v.shape) for k, v in state.items()})
        if diff:
            raise OneBitInputError(
                f"{what} does not fit this run's student ({self.spec.name}): {diff}; it was "
                "written for another model or quantization config."
            )

    def configure_optimizers(self):
        # max_steps when set: estimated_stepping_batches would build the train loader before a
        # checkpoint's loader state is restored (Lightning #20550), losing the data position
        max_steps = self.trainer.max_steps
        total = max_steps if max_steps > 0 else max(1, int(self.trainer.estimated_stepping_batches))
        optimizer, schedule = make_optimizer(self.student, self.optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- validation: perplexity of student (and, once, teacher) on held-out blocks --------------
    @staticmethod
    def _nll_sum(logits: Tensor, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Summed next-token NLL and the number of predicted tokens. Shapes: (B, T, V), (B, T)."""
        nll, weight = next_token_nll(logits, ids, mask)
        return nll.sum(), weight.sum()

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        s, t = self._forward_pair(batch)
        terms = self._loss_terms(s, t, batch)
        self.log("val/loss", terms["loss"], batch_size=ids.shape[0], sync_dist=True)
        parts = {"student": self._nll_sum(s.logits, ids, mask)}
        if self.teacher_val_ppl is None:
            parts["teacher"] = self._nll_sum(t.logits, ids, mask)
        for who, (nll, n) in parts.items():
            acc = self._val_sums.setdefault(
                who, torch.zeros(2, dtype=torch.float64, device=ids.device)
            )
            acc += torch.stack([nll.double(), n.double()])

    def on_validation_epoch_end(self) -> None:
        for who, acc in self._val_sums.items():
            total = self.trainer.strategy.reduce(
                acc, reduce_op="sum"
            )  # sums, not means, over ranks
            ppl = math.exp(total[0].item() / max(total[1].item(), 1.0))
            if who == "teacher":
                if not self.trainer.sanity_checking:
                    self.teacher_val_ppl = ppl
                self.log("val/ppl_teacher", ppl, sync_dist=False)
            else:
                self.log("val/ppl", ppl, prog_bar=True, sync_dist=False)
        if self.teacher_val_ppl is not None and "teacher" not in self._val_sums:
            self.log("val/ppl_teacher", self.teacher_val_ppl, sync_dist=False)
