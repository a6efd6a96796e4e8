"""The quant/ and loss/ config groups compose into the library's validated dataclasses."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from onebit.distill import DistillLossConfig
from onebit.quant import OneBitConfig

from .conftest import REPO


def _node(group: str, name: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf" / group), version_base="1.3"):
        cfg = compose(config_name=name)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "onebit",
            OneBitConfig(
                output_gain=True,
                gain_init="ls",
                outliers=256,
                sign_init="gptq",
                output_norm=False,
                calibration_sequences=32,
            ),
        ),  # the app's
        ("onebit_paper", OneBitConfig()),  # the library's default: the paper's layer
        ("onebit_official", OneBitConfig.official()),
    ],
)
def test_quant_configs(name: str, expected: OneBitConfig) -> None:
    assert OneBitConfig.from_dict(_node("quant", name)) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kd", DistillLossConfig(hidden_weight=30.0)),  # ours: α = 30
        ("kd_paper", DistillLossConfig()),  # the library's default: the paper's α = 1
        ("kd_official", DistillLossConfig.official()),
    ],
)
def test_loss_configs(name: str, expected: DistillLossConfig) -> None:
    assert DistillLossConfig.from_dict(_node("loss", name)) == expected
