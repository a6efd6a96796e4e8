"""W&B keys and Hub tokens live in the environment only: a run writes them to no file."""

from __future__ import annotations

import secrets
from pathlib import Path

from .conftest import cli, tiny


def test_credentials_in_the_environment_reach_no_file(tmp_path: Path, monkeypatch) -> None:
    wandb_key = secrets.token_hex(20)  # the shape of a W&B API key
    hub_token = "hf_" + secrets.token_urlsafe(30).replace("-", "a").replace("_", "b")
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    cfg = tiny(
        tmp_path,
        "logger=wandb",
        "logger.wandb.mode=offline",  # a key is set, so auto would go online
        "trainer.max_steps=2",
        "callbacks.resume.every_n_train_steps=1",
    )
    code, line, _ = cli(cfg)
    assert code == 0, line
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files)
    for p in files:
        data = p.read_bytes()
        assert wandb_key.encode() not in data and hub_token.encode() not in data, p
