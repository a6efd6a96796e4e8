"""The LightningModule on a tiny model: the loss falls, the teacher stays out of checkpoints and
unchanged, and a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import open_dict

from onebit.errors import OneBitInputError
from onebit.train.module import OneBitDistillation, cosine_with_warmup

from .conftest import compose_train


def _run(cfg):
    import train

    return train.run(cfg)


def _student_state(ckpt_path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]


def test_train_loss_falls_and_teacher_is_not_saved(tmp_path, tiny_overrides) -> None:
    cfg = compose_train(
        [*tiny_overrides, "trainer.max_steps=30", "trainer.val_check_interval=10"], tmp_path
    )
    from onebit.models import tiny_causal_lm

    teacher_before = {k: v.clone() for k, v in tiny_causal_lm("llama").state_dict().items()}
    result = _run(cfg)
    # loss falls: mean of the last 5 logged steps well below the first 5
    import csv
    from pathlib import Path

    with open(next(Path(cfg.paths.output_dir).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    for key in (
        "train/loss_kd",
        "train/loss_hidden",
        "train/tokens_per_s",
        "train/lr",
        "train/grad_norm",
    ):
        assert any(r.get(key) for r in rows), key
    # the checkpoint holds the student only
    state = _student_state(result["checkpoint_last"])
    assert state and all(k.startswith("student.") for k in state), list(state)[:5]
    # exactly one model: the teacher's tensors plus g, h, the output gain γ and the outlier
    # weights' values and positions (quant=onebit) for each of the 14 OneBit layers
    assert len(state) == len(teacher_before) + 5 * 14
    # the teacher (reloaded deterministically) is the model we started from, and was never trained:
    # the student's frozen embeddings still equal it, its OneBit layers moved away from SVID
    emb = state["student.model.embed_tokens.weight"]
    torch.testing.assert_close(emb, teacher_before["model.embed_tokens.weight"], atol=0, rtol=0)
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["metrics"]["val/ppl"] > 0 and saved["export"].endswith("onebit_model")
    # the checkpoint of the last step, exported afterwards, is the run's own export, bit for bit
    from safetensors.torch import load_file

    from onebit.export_checkpoint import main as export_main

    export_main([result["checkpoint_last"], str(tmp_path / "again")])
    ours, theirs = (
        load_file(Path(d) / "model.safetensors") for d in (saved["export"], tmp_path / "again")
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_teacher_weights_unchanged_and_not_in_state_dict(tiny_overrides) -> None:
    from onebit.models import tiny_causal_lm

    teacher = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = OneBitDistillation(
        {"name": "t", "source": "tiny", "arch": "llama"},
        teacher=teacher,
        optim={"lr": 1e-2, "warmup_steps": 0},
    )
    module.configure_model()
    module.configure_model()  # idempotent
    assert all(k.startswith("student.") for k in module.state_dict())
    # the frozen parts are the teacher's own tensors (no second copy); trainable ones are not
    shared = {id(q) for q in teacher.parameters()}
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert frozen and all(id(p) in shared for p in frozen)
    assert not any(id(p) in shared for p in module.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    for _ in range(3):
        s, t = module._forward_pair({"input_ids": ids})
        loss = module.loss_fn(s.logits, t.logits, s.hidden_states, t.hidden_states)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".layers." in n for n in trainable)


def test_student_rebuilt_from_its_state_without_weights_gives_the_same_logits() -> None:
    # what an FSDP2 run exports: the gathered state loaded into a student built on no memory
    from onebit.models import tiny_causal_lm

    module = OneBitDistillation(
        {"name": "t", "source": "tiny", "arch": "llama"}, teacher=tiny_causal_lm("llama")
    )
    module.configure_model()
    rebuilt = module.student_from_state(module.student.state_dict())
    assert all(p.device.type == "cpu" for p in rebuilt.parameters())
    assert not any(p.requires_grad for p in rebuilt.parameters())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = module.student.eval()(input_ids=ids).logits
        got = rebuilt(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_blocks_are_converted_and_handed_to_sharding_one_at_a_time() -> None:
    # under FSDP2 `after_block` shards each block at once: when it runs, later blocks are still
    # the teacher's (shared) linears, so the whole fp32 student never exists on one rank
    import copy

    from onebit.models import tiny_causal_lm
    from onebit.quant import OneBitLinear
    from onebit.quant.convert import find_decoder_blocks

    module = OneBitDistillation(
        {"name": "t", "source": "tiny", "arch": "llama"}, teacher=tiny_causal_lm("llama")
    )
    student = copy.deepcopy(module.teacher)
    _, blocks = find_decoder_blocks(student)
    seen = []

    def after_block(block) -> None:
        seen.append([any(isinstance(m, OneBitLinear) for m in b.modules()) for b in blocks])
        assert all(p.dtype == torch.float32 for p in block.parameters())

    module._quantize(student, after_block=after_block)
    assert seen == [[True, False], [True, True]]


def test_resume_continues_the_same_run(tmp_path, tiny_overrides) -> None:
    common = [
        *tiny_overrides,
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "export=false",
        "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.checkpoint.save_top_k=-1",
        "callbacks.checkpoint.monitor=null",
        "callbacks.checkpoint.filename='s{step:03d}'",
    ]
    full = compose_train(common, tmp_path / "full")
    _run(full)
    full_ckpts = sorted((tmp_path / "full" / "out" / "checkpoints").glob("s*.ckpt"))
    mid = next(p for p in full_ckpts if torch.load(p, weights_only=False)["global_step"] == 3)

    resumed = compose_train(common, tmp_path / "resumed")
    with open_dict(resumed):
        resumed.ckpt_path = str(mid)
    _run(resumed)
    a = torch.load(tmp_path / "full" / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], atol=0, rtol=0, msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], atol=0, rtol=0)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.1), (9, 1.0), (10, 1.0), (110, 0.0)])
def test_cosine_with_warmup(step: int, expected: float) -> None:
    assert cosine_with_warmup(step, warmup=10, total=110, min_ratio=0.0) == pytest.approx(expected)
    assert cosine_with_warmup(60, 10, 110, 0.0) == pytest.approx(0.5)


def test_wandb_logger_runs_offline_without_prompt(tmp_path, tiny_overrides, monkeypatch) -> None:
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    overrides = [o for o in tiny_overrides if not o.startswith("logger=")]
    cfg = compose_train([*overrides, "logger=wandb", "trainer.max_steps=2"], tmp_path)
    result = _run(cfg)
    run_dir = result["wandb_dir"]
    assert "offline-run-" in run_dir
    from pathlib import Path

    assert any(Path(run_dir).glob("*.wandb"))  # the run's records, for `wandb sync`


def test_gain_calibration_before_training_and_its_rebuild() -> None:
    """quant.gain_init=rms: the gains are calibrated in configure_model; a rebuilt student (export,
    evaluation) takes them from the state dict without calibrating again."""
    import copy

    from onebit.models import tiny_causal_lm
    from onebit.quant import OneBitConfig, calibrate_output_gains_, freeze_, quantize_

    teacher = tiny_causal_lm("llama")
    q = OneBitConfig(output_gain=True, gain_init="rms", calibration_sequences=2)
    spec = {"name": "t", "source": "tiny", "arch": "llama"}
    module = OneBitDistillation(spec, quant=q, teacher=teacher)
    ids = torch.randint(0, 128, (3, 12))
    module.calibration_ids = ids
    module.configure_model()
    expected = freeze_(quantize_(copy.deepcopy(teacher), q))
    calibrate_output_gains_(teacher, expected, ids[:2], "rms")  # the first calibration_sequences
    layer = "model.layers.1.mlp.down_proj"
    got = module.student.get_submodule(layer).out_gain
    torch.testing.assert_close(got, expected.get_submodule(layer).out_gain, atol=0, rtol=0)
    assert not torch.equal(got, torch.ones_like(got))
    rebuilt = module.student_from_state(module.student.state_dict())
    torch.testing.assert_close(rebuilt.get_submodule(layer).out_gain, got, atol=0, rtol=0)
    without = OneBitDistillation(spec, quant=q, teacher=tiny_causal_lm("llama"))
    with pytest.raises(OneBitInputError, match="needs training text"):
        without.configure_model()


def test_train_py_with_calibrated_gains_exports_them(tmp_path, tiny_overrides) -> None:
    from onebit.export import load_onebit

    cfg = compose_train(
        [*tiny_overrides, "quant.output_gain=true", "quant.gain_init=ls", "export_dtype=float32"],
        tmp_path,
    )
    result = _run(cfg)
    model = load_onebit(result["export"])
    gains = [m.out_gain for n, m in model.named_modules() if n.endswith("down_proj")]
    assert len(gains) == 2 and all(not torch.equal(g, torch.ones_like(g)) for g in gains)


def test_train_py_calibrates_at_data_calibration_seq_len(tmp_path, tiny_overrides, monkeypatch):
    """data.calibration_seq_len: calibration reads sequences of that length; the block-wise stage
    and the training steps keep data.seq_len."""
    import onebit.train.module

    seen: dict[str, list] = {"calibrate": [], "blockwise": []}
    calibrate, blockwise = (
        onebit.train.module.init_from_calibration_,
        onebit.train.module.blockwise_reconstruct_,
    )

    def spy_calibrate(teacher, student, config, ids, *args, **kwargs):
        seen["calibrate"].append(tuple(ids.shape))
        return calibrate(teacher, student, config, ids, *args, **kwargs)

    def spy_blockwise(teacher, student, ids, *args, **kwargs):
        seen["blockwise"].append(tuple(ids.shape))
        return blockwise(teacher, student, ids, *args, **kwargs)

    monkeypatch.setattr(onebit.train.module, "init_from_calibration_", spy_calibrate)
    monkeypatch.setattr(onebit.train.module, "blockwise_reconstruct_", spy_blockwise)
    cfg = compose_train(
        [*tiny_overrides, "quant.output_gain=true", "quant.gain_init=ls",
         "quant.calibration_sequences=2", "data.calibration_seq_len=40", "blockwise.steps=1",
         "blockwise.sequences=4", "trainer.max_steps=2", "export=false"],
        tmp_path,
    )  # fmt: skip
    _run(cfg)
    assert seen == {"calibrate": [(2, 40)], "blockwise": [(4, 16)]}


def test_train_py_with_gptq_signs_reports_and_exports_them(tmp_path, tiny_overrides) -> None:
    """quant.sign_init=gptq: configure_model chooses the signs on the calibration text; the run
    reports each layer's error (lower than SVID's) and exports those signs when the latent
    weights do not learn (optim.latent_lr=0)."""
    from onebit.export import load_onebit
    from onebit.models import tiny_causal_lm
    from onebit.quant import PackedOneBitLinear

    cfg = compose_train(
        [*tiny_overrides, "quant.sign_init=gptq", "quant.output_norm=false", "optim.latent_lr=0",
         "export_dtype=float32"],
        tmp_path,
    )  # fmt: skip
    result = _run(cfg)
    errors = result["sign_init_errors"]
    assert len(errors) == 14 and all(e["gptq"] < e["svid"] for e in errors.values()), errors
    model = load_onebit(result["export"])
    teacher = tiny_causal_lm("llama")
    differ = 0
    for name, m in model.named_modules():
        if isinstance(m, PackedOneBitLinear):
            signs = m.signs()
            differ += int((signs != torch.sign(teacher.get_submodule(name).weight)).sum())
    assert differ > 0  # GPTQ chose some signs other than sign(W), and the export has them


def test_train_py_runs_the_blockwise_stage_with_outliers_and_exports(tmp_path, tiny_overrides):
    """blockwise.steps>0: the stage runs at the start of fit, lowers every block's error, is
    reported; the student with outlier weights exports and reloads to the same logits."""
    from onebit.export import load_onebit

    cfg = compose_train(
        [
            *tiny_overrides,
            "trainer.max_steps=4",
            "quant.outliers=6",
            "blockwise.steps=5",
            "blockwise.sequences=8",
            "export_dtype=float32",
        ],
        tmp_path,
    )
    result = _run(cfg)
    blocks = result["blockwise"]["blocks"]
    assert [b["block"] for b in blocks] == [0, 1]  # tiny_llama has two blocks
    assert all(b["rel_err_after"] < b["rel_err_before"] for b in blocks)
    assert (tmp_path / "out" / "blockwise_state.pt").is_file()
    model = load_onebit(result["export"])
    kept = [m.outlier_value.numel() for n, m in model.named_modules() if n.endswith("down_proj")]
    assert kept == [6, 6]
    assert result["footprint"]["outlier_weights"] == 6 * 14  # 7 linears in each of 2 blocks


def test_blockwise_stage_resumes_after_a_kill_and_is_skipped_on_checkpoint_resume(
    tmp_path, tiny_overrides, monkeypatch
) -> None:
    """A stage killed after its first block resumes from the run directory's state to the same
    student as an uninterrupted one; resuming training from a checkpoint does not rerun it."""
    import onebit.distill.blockwise as bw_mod
    import onebit.train.module as module_mod

    common = [*tiny_overrides, "trainer.max_steps=2", "export=false", "blockwise.steps=4",
              "blockwise.sequences=8", "validate_before_training=false"]  # fmt: skip
    full = _run(compose_train(common, tmp_path / "full"))

    real = bw_mod.blockwise_reconstruct_

    def killed(*args, **kwargs):
        return real(*args, **{**kwargs, "_stop_after": 0})

    monkeypatch.setattr(module_mod, "blockwise_reconstruct_", killed)
    cut = compose_train(common, tmp_path / "cut")
    with pytest.raises(Exception, match="stopped after block 0"):
        _run(cut)
    assert not (tmp_path / "cut" / "out" / "checkpoints" / "last.ckpt").exists()
    monkeypatch.setattr(module_mod, "blockwise_reconstruct_", real)
    with open_dict(cut):
        cut.ckpt_path = "auto"  # no checkpoint yet: a new run in the same directory
    resumed = _run(cut)
    assert resumed["blockwise"] == {**full["blockwise"], "seconds": resumed["blockwise"]["seconds"]}
    a = _student_state(tmp_path / "full" / "out" / "checkpoints" / "last.ckpt")
    b = _student_state(tmp_path / "cut" / "out" / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)

    calls = []
    monkeypatch.setattr(module_mod, "blockwise_reconstruct_", lambda *a, **k: calls.append(1))
    again = compose_train([*common, "trainer.max_steps=3"], tmp_path / "full")
    with open_dict(again):
        again.ckpt_path = "auto"
    assert _run(again)["global_step"] == 3 and calls == []


def test_keep_massive_keeps_exactly_the_layers_it_finds_and_footprint_counts_them() -> None:
    """quant.keep_massive=k: configure_model finds the k layers on the calibration text, keeps
    them full precision by name (in the module's config and its saved hyperparameters), and a
    rebuilt student has the same layers."""
    from onebit.models import tiny_causal_lm
    from onebit.quant import OneBitConfig, OneBitLinear, footprint, massive_layer_names

    teacher = tiny_causal_lm("llama")
    with torch.no_grad():
        teacher.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(1e4)
        teacher.get_submodule("model.layers.1.mlp.up_proj").weight.mul_(1e3)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    expected = massive_layer_names(teacher, ids[:2], 2)  # on the first calibration_sequences
    assert len(expected) == 2 and expected[0] == "model.layers.1.mlp.down_proj"
    spec = {"name": "t", "source": "tiny", "arch": "llama"}
    q = OneBitConfig(keep_massive=2, calibration_sequences=2)
    module = OneBitDistillation(spec, quant=q, teacher=teacher)
    module.calibration_ids = ids
    module.configure_model()
    assert module.kept_massive == expected
    assert module.quant.keep_massive == 0 and module.quant.skip_modules == tuple(expected)
    assert module.hparams["quant"]["skip_modules"] == expected
    assert module.hparams["quant"]["keep_massive"] == 0
    kept = {n for n, m in module.student.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {*expected, "lm_head"}
    assert sum(isinstance(m, OneBitLinear) for m in module.student.modules()) == 14 - 2
    report = footprint(module.student, module.quant)
    assert report.kept_layers == 2
    assert report.kept_params == sum(teacher.get_submodule(n).weight.numel() for n in expected)
    rebuilt = module.student_from_state(module.student.state_dict())
    assert {n for n, m in rebuilt.named_modules() if type(m) is torch.nn.Linear} == kept


def test_train_py_with_keep_massive_reports_and_exports_the_kept_layers(
    tmp_path, tiny_overrides, monkeypatch
) -> None:
    import onebit.train.module
    from onebit.export import load_onebit

    found = []

    def spy(teacher, ids, k):  # the tiny random teacher writes nothing massive: name one layer
        found.append((tuple(ids.shape), k))
        return ["model.layers.0.mlp.up_proj"]

    monkeypatch.setattr(onebit.train.module, "massive_layer_names", spy)
    cfg = compose_train(
        [*tiny_overrides, "quant.keep_massive=1", "quant.calibration_sequences=2",
         "trainer.max_steps=2", "export_dtype=float32"],
        tmp_path,
    )  # fmt: skip
    result = _run(cfg)
    assert found == [((2, 16), 1)] and result["kept_massive"] == ["model.layers.0.mlp.up_proj"]
    model = load_onebit(result["export"])
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")) is torch.nn.Linear
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")) is not torch.nn.Linear


def test_attention_loss_trains_through_eager_maps_and_leaves_the_attention_kind() -> None:
    # loss.attention_weight: both forward passes return attention maps (eager attention), the
    # term reaches the latent weights through them, and each model keeps its own kind afterwards
    from onebit.models import tiny_causal_lm

    teacher = tiny_causal_lm("llama")
    teacher.config._attn_implementation = "sdpa"
    module = OneBitDistillation(
        {"name": "t", "source": "tiny", "arch": "llama"},
        teacher=teacher,
        loss={"hidden_weight": 0.0, "kd_weight": 0.0, "attention_weight": 1.0},
    )
    module.configure_model()
    batch = {"input_ids": torch.randint(0, 128, (2, 12))}
    s, t = module._forward_pair(batch)
    assert len(s.attentions) == len(t.attentions) == teacher.config.num_hidden_layers
    terms = module._loss_terms(s, t, batch)
    assert set(terms) == {"attention", "loss"} and terms["attention"] > 0
    terms["loss"].backward()
    q = module.student.model.layers[0].self_attn.q_proj
    grads = [p.grad for n, p in q.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert teacher.config._attn_implementation == "sdpa"
    assert module.student.config._attn_implementation == "sdpa"
    # without the term, no maps are asked for
    plain = OneBitDistillation(
        {"name": "t", "source": "tiny", "arch": "llama"}, teacher=tiny_causal_lm("llama")
    )
    plain.configure_model()
    assert plain._forward_pair(batch)[0].attentions is None


def test_attention_loss_with_activation_checkpointing_recomputes_the_same_maps() -> None:
    # backward recomputes each block: the student runs eager attention throughout, so the
    # recomputation matches, and its gradients equal those of the run without checkpointing
    from onebit.models import tiny_causal_lm

    batch = {"input_ids": torch.randint(0, 128, (2, 12))}
    grads = []
    for checkpointing in (False, True):
        module = OneBitDistillation(
            {"name": "t", "source": "tiny", "arch": "llama"},
            teacher=tiny_causal_lm("llama"),
            loss={"attention_weight": 1.0},
            parallel={"activation_checkpointing": checkpointing},
        )
        module.configure_model()
        module.student.train()
        s, t = module._forward_pair(batch)
        module._loss_terms(s, t, batch)["loss"].backward()
        if checkpointing:
            assert module.student.config._attn_implementation == "eager"
        grads.append(module.student.model.layers[1].self_attn.k_proj.in_scale.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
