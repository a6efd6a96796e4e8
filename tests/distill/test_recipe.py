"""onebit.distill.recipe: one optimizer recipe for the LightningModule and the results benchmark."""

from __future__ import annotations

import copy

import pytest
import torch

from onebit.distill.recipe import OptimConfig, make_optimizer, param_groups
from onebit.errors import OneBitInputError
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, freeze_, quantize_


@pytest.fixture
def student():
    return freeze_(quantize_(tiny_causal_lm("opt"), OneBitConfig()))  # OPT: biases too


def test_groups_by_role_with_their_rates(student) -> None:
    o = OptimConfig(lr=1e-3, latent_lr=3.0, scale_lr=10.0, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(student, o)}
    names = {id(p): n for n, p in student.named_parameters()}
    role = {
        "latent": lambda n: n.endswith(".weight"),
        "scale": lambda n: n.endswith(("in_scale", "out_scale")),
        "bias": lambda n: n.endswith(".bias"),
    }
    for key, group in groups.items():
        assert all(role[key](names[id(p)]) for p in group["params"]), key
    assert groups["latent"]["lr"] == pytest.approx(3e-3)
    assert groups["scale"]["lr"] == pytest.approx(1e-2)
    assert groups["bias"]["lr"] == 1e-3 and groups["bias"]["weight_decay"] == 0.0
    assert groups["latent"]["weight_decay"] == groups["scale"]["weight_decay"] == 0.1
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)


def test_schedule_warms_up_then_decays(student) -> None:
    o = OptimConfig(lr=1e-3, warmup_steps=4, scale_lr=2.0)
    opt, sched = make_optimizer(student, o, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0][0] == pytest.approx(1e-3 / 4) and lrs[3][0] == pytest.approx(1e-3)
    assert all(s == pytest.approx(2 * w) for w, s, _ in lrs)  # the multiple holds throughout
    assert lrs[-1][0] < 1e-5


def test_the_paper_recipe_is_one_rate_for_all(student) -> None:
    groups = param_groups(student, OptimConfig(lr=4e-4))
    assert {g["lr"] for g in groups} == {4e-4}


def test_no_trainable_parameter_is_refused() -> None:
    frozen = tiny_causal_lm("llama").requires_grad_(False)
    with pytest.raises(OneBitInputError, match="no trainable parameter"):
        make_optimizer(frozen, OptimConfig(), 10)


def test_bad_multipliers_are_refused() -> None:
    with pytest.raises(OneBitInputError, match=r"optim\.scale_lr"):
        OptimConfig(scale_lr=-1.0)
    with pytest.raises(OneBitInputError, match=r"optim\.latent_lr"):
        OptimConfig(latent_lr=float("nan"))


def test_module_and_results_benchmark_build_the_same_optimizer(tmp_path) -> None:
    """The LightningModule's configure_optimizers and the benchmark's loop share the recipe."""
    import lightning as L

    from onebit.train.module import OneBitDistillation

    teacher = tiny_causal_lm("llama")
    o = OptimConfig(lr=2e-3, scale_lr=10.0, latent_lr=0.5, warmup_steps=2)
    module = OneBitDistillation({"name": "tiny", "source": "tiny", "arch": "llama"},
                                optim=o, teacher=copy.deepcopy(teacher))  # fmt: skip
    module.configure_model()
    trainer = L.Trainer(max_steps=7, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)  # fmt: skip
    module.trainer = trainer
    got = module.configure_optimizers()["optimizer"]
    want, _ = make_optimizer(module.student, o, 7)
    assert [(g["name"], g["lr"], len(g["params"])) for g in got.param_groups] == [
        (g["name"], g["lr"], len(g["params"])) for g in want.param_groups
    ]
    assert torch.is_tensor(got.param_groups[0]["params"][0])
