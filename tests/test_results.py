"""benchmarks/results.py: rows are what they claim, runs reproduce, the files are right."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, open_dict

from onebit.distill import DistillLossConfig
from onebit.errors import OneBitInputError
from onebit.eval.perplexity import perplexity
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, OneBitLinear, iter_target_linears, xnor_approx
from onebit.train.build import container
from onebit.train.module import OptimConfig

from .conftest import REPO, compose_config, shared_path

_spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def compose_results(overrides: list[str], tmp: Path | None = None) -> DictConfig:
    cfg = compose_config("results", overrides, tmp)
    if tmp is not None:
        with open_dict(cfg):
            cfg.plot = str(tmp / "out" / "results.png")
    return cfg


@pytest.mark.parametrize(
    "experiment", ["results_stories260k", "results_smollm2_135m", "levers_demo_smollm2_135m"]
)
def test_a_run_plots_into_its_own_directory_never_into_docs(tmp_path, experiment):
    # a partial run (rows=[...]) must not replace the plot a docs/ page shows; that page's command
    # names it (plot=docs/...)
    cfg = compose_config("results", [f"experiment={experiment}"], tmp_path)
    assert cfg.plot is None or Path(cfg.plot).parent == tmp_path / "out"


@pytest.mark.parametrize("experiment", ["results_stories260k", "results_smollm2_135m"])
def test_every_ablation_changes_exactly_its_own_key(experiment: str) -> None:
    cfg = compose_results([f"experiment={experiment}"])
    ab = results.ablation_configs(cfg)
    base_q, base_l = OneBitConfig(), DistillLossConfig()
    assert set(ab) == {
        "ref", "svd_init", "copy_init", "no_ln", "alpha_0", "alpha_10", "official_loss",
        "gain", "gain_rms", "gain_ls", "keep_massive", "latent_small", "outliers",
        "gain_ls_outliers", "gain_ls_outliers_bw", "gain_ls_no_ln", "latent_lr3", "gptq",
        "gain_ls_no_ln_gptq", "gain_ls_outliers_no_ln", "gain_ls_outliers_no_ln_42",
        "gain_ls_outliers_no_ln_gptq", "gptq_frozen_signs", "len512", "len2048",
        "self_generated", "latent_lr03", "calib2048", "calib2048_4",
        "gain_ls_outliers_no_ln_gptq_47", "self_generated_calib2048", "scale_lr1", "scale_lr3",
        "lr3e-4", "calib2048_alpha0", "calib2048_alpha10", "scale_lr30", "calib2048_120",
        "calib2048_alpha10_120", "calib2048_320", "calib2048_alpha10_320", "calib2048_alpha30_120",
        "calib2048_alpha100_120", "calib2048_alpha30_320", "calib2048_alpha30_len512_120",
        "calib2048_alpha30_attn3_120", "calib2048_alpha30_attn03_120",
        "calib2048_alpha30_fp_qk_120", "calib2048_alpha30_fp_vo_120", "calib2048_alpha30_rms_120",
        "calib2048_alpha30_rms_320", "calib2048_alpha30_long2048_320",
    }  # fmt: skip
    base = results.base_arm(cfg)
    assert (ab["ref"].quant, ab["ref"].loss) == (base_q, base_l)
    assert ab["ref"][1:] == base[1:]  # the reference is the main row's recipe
    assert ab["svd_init"].quant == OneBitConfig(svid_method="svd")
    assert ab["copy_init"].quant == OneBitConfig(svid_method="none")
    assert ab["no_ln"].quant == OneBitConfig(output_norm=False)
    assert ab["alpha_0"].loss == DistillLossConfig(hidden_weight=0.0)
    assert ab["alpha_10"].loss == DistillLossConfig(hidden_weight=10.0)
    assert ab["official_loss"].loss == DistillLossConfig.official()
    for key in ("alpha_0", "alpha_10", "official_loss"):
        assert ab[key].quant == base_q
    assert ab["gain"].quant == OneBitConfig(output_gain=True)
    assert ab["gain_rms"].quant == OneBitConfig(output_gain=True, gain_init="rms")
    assert ab["gain_ls"].quant == OneBitConfig(output_gain=True, gain_init="ls")
    assert ab["latent_small"].quant == OneBitConfig(latent_init_scale=1e-3)
    assert ab["keep_massive"][1:3] == (base_q, base_l) and ab["keep_massive"].keep_massive == 5
    assert ab["outliers"].quant == OneBitConfig(outliers=256)
    gain_ls = dict(output_gain=True, gain_init="ls")
    assert ab["gain_ls_outliers"].quant == OneBitConfig(**gain_ls, outliers=256)
    assert ab["gain_ls_no_ln"].quant == OneBitConfig(**gain_ls, output_norm=False)
    assert ab["gain_ls_outliers_bw"].quant == ab["gain_ls_outliers"].quant
    assert ab["gain_ls_outliers_bw"].blockwise.steps == 20
    assert ab["latent_lr3"].optim == OptimConfig.from_dict({**dict(cfg.optim), "latent_lr": 3.0})
    assert ab["latent_lr3"].quant == base_q
    gptq = dict(sign_init="gptq", calibration_sequences=32)
    assert ab["gptq"].quant == OneBitConfig(**gptq)
    no_ln = dict(**gain_ls, output_norm=False)
    assert ab["gain_ls_no_ln_gptq"].quant == OneBitConfig(**no_ln, **gptq)
    assert ab["gain_ls_outliers_no_ln"].quant == OneBitConfig(**no_ln, outliers=256)
    assert ab["gain_ls_outliers_no_ln_42"].quant == ab["gain_ls_outliers_no_ln"].quant
    assert ab["gain_ls_outliers_no_ln_42"].steps == 42  # the GPTQ row's training time
    assert ab["gain_ls_outliers_no_ln_gptq"].quant == OneBitConfig(**no_ln, outliers=256, **gptq)
    frozen = ab["gptq_frozen_signs"]
    assert frozen.quant == ab["gain_ls_outliers_no_ln_gptq"].quant
    assert frozen.optim == OptimConfig.from_dict({**dict(cfg.optim), "latent_lr": 0.0})
    onebit = ab["gain_ls_outliers_no_ln_gptq"].quant  # quant=onebit's layer: the fourth run's
    two = dataclasses.replace(onebit, calibration_sequences=2)
    assert (ab["len512"].seq_len, ab["len512"].batch_size, ab["len512"].quant) == (
        512, 1, dataclasses.replace(onebit, calibration_sequences=8)
    )  # fmt: skip
    assert (ab["len2048"].seq_len, ab["len2048"].batch_size, ab["len2048"].steps) == (2048, 1, 8)
    assert (ab["self_generated"].source, ab["self_generated"].quant) == ("self_generated", onebit)
    assert ab["latent_lr03"].optim == OptimConfig.from_dict({**dict(cfg.optim), "latent_lr": 0.3})
    assert (ab["calib2048"].calibration_seq_len, ab["calib2048"].quant) == (2048, two)
    assert ab["calib2048_4"].quant.calibration_sequences == 4
    assert ab["gain_ls_outliers_no_ln_gptq_47"].steps == 47
    sg = ab["self_generated_calib2048"]
    assert (sg.source, sg.calibration_seq_len, sg.quant) == ("self_generated", 2048, two)
    for key, change in (("scale_lr1", {"scale_lr": 1.0}), ("scale_lr3", {"scale_lr": 3.0}),
                        ("lr3e-4", {"lr": 3e-4}), ("scale_lr30", {"scale_lr": 30.0})):  # fmt: skip
        assert ab[key].optim == OptimConfig.from_dict({**dict(cfg.optim), **change})
        assert (ab[key].calibration_seq_len, ab[key].quant) == (2048, two)
    loss_rows = [("calib2048_alpha0", 0.0, None), ("calib2048_alpha10", 10.0, None)]
    loss_rows += [("calib2048_120", 1.0, 120), ("calib2048_alpha10_120", 10.0, 120)]
    loss_rows += [("calib2048_320", 1.0, 320), ("calib2048_alpha10_320", 10.0, 320)]
    loss_rows += [("calib2048_alpha30_120", 30.0, 120), ("calib2048_alpha100_120", 100.0, 120)]
    loss_rows += [("calib2048_alpha30_320", 30.0, 320)]
    for key, alpha, steps in loss_rows:
        assert (ab[key].calibration_seq_len, ab[key].quant, ab[key].steps) == (2048, two, steps)
        assert ab[key].loss == DistillLossConfig(hidden_weight=alpha)
        assert ab[key].optim == base.optim
    l512, a30 = ab["calib2048_alpha30_len512_120"], ab["calib2048_alpha30_120"]
    assert (l512.seq_len, l512.batch_size, a30.seq_len * a30.batch_size) == (512, 1, 512)
    assert l512._replace(seq_len=a30.seq_len, batch_size=a30.batch_size)[1:] == a30[1:]
    more = ("latent_lr3", "gain_ls_outliers_bw", "gain_ls_outliers_no_ln_42", "gptq_frozen_signs")
    more += ("len512", "len2048", "latent_lr03", "gain_ls_outliers_no_ln_gptq_47", "scale_lr1")
    attn = (("calib2048_alpha30_attn3_120", 3.0), ("calib2048_alpha30_attn03_120", 0.3))
    for key, beta in attn:  # the α = 30 row with the attention KL: only the loss differs
        assert ab[key].loss == DistillLossConfig(hidden_weight=30.0, attention_weight=beta)
        assert ab[key]._replace(loss=a30.loss)[1:] == a30[1:]
    for steps in (120, 320):  # the α = 30 rows with RMS-calibrated gains
        rms, a30_n = ab[f"calib2048_alpha30_rms_{steps}"], ab[f"calib2048_alpha30_{steps}"]
        assert rms.quant == dataclasses.replace(a30_n.quant, gain_init="rms")
        assert rms._replace(quant=a30_n.quant)[1:] == a30_n[1:] and rms.steps == steps
        more += (f"calib2048_alpha30_rms_{steps}",)
    for key, kept in (("qk", ("q_proj", "k_proj")), ("vo", ("v_proj", "o_proj"))):
        arm = ab[f"calib2048_alpha30_fp_{key}_120"]  # the α = 30 row with two linears kept
        assert arm.quant.skip_modules == tuple(f"*.{name}" for name in kept)
        assert arm._replace(quant=a30.quant)[1:] == a30[1:]
        assert dataclasses.replace(arm.quant, skip_modules=()) == a30.quant
        more += (f"calib2048_alpha30_fp_{key}_120",)
    long, a30_320 = ab["calib2048_alpha30_long2048_320"], ab["calib2048_alpha30_320"]
    assert (long.steps, long.long_steps) == (240, results.LongSteps(2048, 1, 20))
    assert long._replace(steps=320, long_steps=None)[1:] == a30_320[1:] and a30_320.steps == 320
    more += ("calib2048_alpha30_long2048_320",)
    more += ("scale_lr3", "lr3e-4", "scale_lr30", "calib2048_alpha30_len512_120")
    more += tuple(key for key, _ in attn)
    more += tuple(key for key, _, _ in loss_rows)
    for key, arm in ab.items():  # nothing but its own key changes
        if key in more:  # these change optim, the data shape or the steps too (checked above)
            continue
        if key != "keep_massive":
            assert (arm.optim, arm.seq_len, arm.batch_size, arm.keep_massive) == base[3:7]
        assert (arm.blockwise, arm.steps) == (base.blockwise, None)
        assert arm.loss == base_l or arm.quant == base_q
    OptimConfig.from_dict(dict(cfg.optim))  # the budget's optimizer is valid


def test_arm_overrides_reach_optim_data_train_and_calibration() -> None:
    cfg = compose_results(
        [
            "experiment=results_smollm2_135m",
            "+ablations.lever.optim={latent_lr: 10.0}",
            "+ablations.lever.data={seq_len: 512, source: c4, calibration_seq_len: 2048}",
            "+ablations.lever.train={batch_size: 1}",
            "+ablations.lever.keep_massive=3",
            "+ablations.lever.quant={output_gain: true, gain_init: rms}",
        ]
    )
    base, arm = results.base_arm(cfg), results.ablation_configs(cfg)["lever"]
    assert arm.optim == OptimConfig.from_dict({**dict(cfg.optim), "latent_lr": 10.0})
    assert arm.optim.scale_lr == base.optim.scale_lr == 10.0  # the experiment's g/h rate kept
    assert (arm.seq_len, arm.batch_size, arm.keep_massive) == (512, 1, 3)
    assert (arm.source, arm.calibration_seq_len) == ("c4", 2048)
    assert (base.source, base.calibration_seq_len) == (None, None)  # None: the base's
    assert arm.quant == OneBitConfig(output_gain=True, gain_init="rms")


@pytest.mark.parametrize(
    "override, match",
    [
        ("+ablations.bad.keep_massive=-1", r"ablations\.bad\.keep_massive=-1"),
        ("+ablations.bad.quant={gain_init: rms}", r"quant\.output_gain=true"),
        ("+ablations.bad.data={seq: 3}", r"ablations\.bad\.data has unknown key"),
        ("+ablations.bad.optim={lr: -1}", r"optim\.lr"),
        ("+ablations.bad.train={steps: 0}", r"ablations\.bad\.train\.steps=0"),
        (
            "+ablations.bad.train={long_steps: {seq_len: 64}}",
            r"ablations\.bad\.train\.long_steps=\{'seq_len': 64\} must give seq_len, batch_size",
        ),
        (
            "+ablations.bad.train={long_steps: {seq_len: 64, batch_size: 0, steps: 2}}",
            r"ablations\.bad\.train\.long_steps\.batch_size=0 must be an integer >= 1",
        ),
        ("+ablations.bad.data={source: wiki}", r"ablations\.bad\.data\.source='wiki' is not one"),
        (
            "+ablations.bad.data={calibration_seq_len: 0}",
            r"ablations\.bad\.data\.calibration_seq_len=0 must be",
        ),
        ("+ablations.bad.blockwise={loss: l1}", r"blockwise\.loss"),
        (
            "+ablations.bad.base=nope",
            r"ablations\.bad\.base='nope' is not an ablation; valid: ref,",
        ),
        ("+ablations.bad.base=bad", r"ablations\.bad\.base='bad' makes a cycle: bad -> bad\.$"),
    ],
)
def test_bad_arm_overrides_are_one_sentence(override: str, match: str) -> None:
    from onebit.errors import OneBitInputError

    with pytest.raises(OneBitInputError, match=match):
        results.ablation_configs(compose_results([override]))


def test_an_ablation_starts_from_its_base_key_by_key() -> None:
    specs = {
        "a": {"label": "A", "quant": {"outliers": 256, "output_gain": True}, "train": {"steps": 7}},
        "b": {"base": "a", "quant": {"outliers": 8}, "loss": {"hidden_weight": 10.0}},
        "c": {"base": "b", "label": "C", "train": {"batch_size": 2}, "keep_massive": 3},
        "x": {"base": "y"},
        "y": {"base": "x"},
    }
    assert results.ablation_spec(specs, "b") == {
        "label": "b",  # its own key: a base's label is not inherited
        "quant": {"outliers": 8, "output_gain": True},
        "loss": {"hidden_weight": 10.0},
        "train": {"steps": 7},
    }
    assert results.ablation_spec(specs, "c") == {
        "label": "C",
        "quant": {"outliers": 8, "output_gain": True},
        "loss": {"hidden_weight": 10.0},
        "train": {"steps": 7, "batch_size": 2},
        "keep_massive": 3,
    }
    with pytest.raises(
        OneBitInputError, match=r"ablations\.y\.base='x' makes a cycle: x -> y -> x\."
    ):
        results.ablation_spec(specs, "x")
    # the shipped rows: a row's base stands for the base's overrides, and the resume check sees
    # the resolved row (a base that changes makes the row run again)
    cfg = compose_results(["experiment=results_smollm2_135m"])
    ab = results.ablation_configs(cfg)
    assert cfg.ablations.calib2048_alpha10_320.base == "calib2048_alpha10"
    assert ab["calib2048_alpha10_320"].quant == ab["calib2048"].quant
    assert ab["calib2048_alpha10_320"].loss.hidden_weight == 10.0
    assert results.ablation_spec(container(cfg.ablations), "calib2048_alpha10_320")["data"] == {
        "calibration_seq_len": 2048
    }


def test_unknown_ablation_key_is_one_sentence() -> None:
    from onebit.errors import OneBitInputError

    cfg = compose_results(["+ablations.bad.quant_x={}"])
    with pytest.raises(OneBitInputError, match=r"ablations\.bad has unknown key"):
        results.ablation_configs(cfg)


def test_xnor_row_computes_sign_times_row_mean_abs() -> None:
    teacher = tiny_causal_lm("llama")
    student = results.xnor_student(teacher)
    dense = {n: m.weight for n, m in iter_target_linears(teacher)}
    layers = dict(iter_target_linears(student))
    assert dense.keys() == layers.keys()
    x = torch.randn(3, 5, 64)
    for name, W in dense.items():
        layer = layers[name]
        assert isinstance(layer, OneBitLinear) and not layer.config.output_norm
        xin = x[..., : W.shape[1]]
        ref = F.linear(xin, xnor_approx(W))
        torch.testing.assert_close(layer(xin), ref, rtol=1e-5, atol=1e-6)


def test_c4_training_documents_never_reach_the_evaluation(tmp_path, stories_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_path)
    short = "The cat sat on the mat. " * 3
    long = "Zebra zebra zebra. " * 200  # far more than 64 tokens: only the evaluation sees it
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in [short, long] * 10) + "\n")
    blocks = results.c4_train_blocks(tok, str(path), seq_len=16, max_doc_tokens=64)
    zebra = set(tok(long)["input_ids"]) - set(tok(short)["input_ids"])
    assert blocks.shape[1] == 16 and len(blocks) > 0
    assert not zebra & set(blocks.flatten().tolist())


@pytest.fixture
def tiny_run(tmp_path, stories_path) -> DictConfig:
    """The stories260K experiment shrunk to seconds: 2 ablations, a few steps each."""
    cfg = compose_results(
        [
            "experiment=results_stories260k",
            f"model.path={stories_path}",
            "logger=none",
            "threads=1",
            "data.num_sequences=16",
            "data.val_sequences=4",
            "data.seq_len=32",
            "data.gen_batch_size=20",
            "train.batch_size=4",
            "train.steps=16",
            "train.ablation_steps=8",
            "train.eval_every=8",
            "eval.curve_windows=2",
            "optim.warmup_steps=1",
        ],
        tmp_path,
    )
    with open_dict(cfg):
        cfg.ablations = {k: v for k, v in cfg.ablations.items() if k in ("ref", "no_ln")}
    return cfg


def test_benchmark_rows_files_and_reproducibility(tiny_run: DictConfig, tmp_path, capsys) -> None:
    out = results.run(tiny_run)
    keys = [r["key"] for r in out["rows"]]
    assert keys == ["teacher", "xnor", "svid", "svid_no_ln", "onebit", "ref", "no_ln"]
    rows = {r["key"]: r for r in out["rows"]}
    gen = {k: r["ppl"]["generated"] for k, r in rows.items()}
    assert all(g["n_windows"] == 4 and g["n_tokens"] == 4 * 31 for g in gen.values())
    # untrained rows: the teacher's perplexity is the plain library call; SVID init is the curve's
    # first point of the reference run (the same student before its first step)
    assert rows["teacher"]["train"] is None
    assert rows["ref"]["train"]["curve"][0]["ppl"] == pytest.approx(rows["svid"]["curve_ppl"])
    onebit = rows["onebit"]["train"]
    assert [p["step"] for p in onebit["curve"]] == [0, 8, 16]
    assert onebit["tokens"] == 16 * 4 * 32
    assert onebit["curve"][-1]["ppl"] < onebit["curve"][0]["ppl"]  # training helps
    assert gen["onebit"]["ppl"] < min(gen["xnor"]["ppl"], gen["svid"]["ppl"])
    # files
    d = Path(tiny_run.paths.output_dir)
    saved = json.loads((d / "results.json").read_text())
    assert [r["key"] for r in saved["rows"]] == keys
    assert (d / "results.csv").read_text().count("\n") == 1 + len(keys)
    assert (d / "curves.csv").read_text().count("\n") == 1 + 3 + 2 + 2
    md = (d / "results.md").read_text()
    assert md.startswith("# OneBit results") and "\n- machine: " in md and "\n- date: " in md
    assert "\n\n| Method | Gen. |" in md
    assert "XNOR sign(W)·mean\\|W\\|" in md
    printed = capsys.readouterr().out
    assert f"| {gen['onebit']['ppl']:.2f} |" in printed
    # a rerun gives the same numbers to the last bit
    with open_dict(tiny_run):
        tiny_run.paths.output_dir = str(tmp_path / "again")
        tiny_run.rows = ["onebit"]
    again = results.run(tiny_run)["rows"][0]
    assert again["ppl"] == rows["onebit"]["ppl"]
    assert again["train"]["curve"] == [
        {**p, "train_s": q["train_s"]} for p, q in zip(onebit["curve"], again["train"]["curve"])
    ]


def test_a_killed_run_resumes_its_finished_rows(
    tiny_run: DictConfig, tmp_path, monkeypatch
) -> None:
    """Each row is kept as it finishes; ``resume_dir`` reuses the rows made with the same settings
    and runs the rest, and the exported student is the row's model."""
    from onebit.export import load_onebit

    with open_dict(tiny_run):
        tiny_run.rows = ["teacher", "xnor", "onebit"]
    first_dir = Path(tiny_run.paths.output_dir)
    real_distill = results.distill

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies in its trained row

    monkeypatch.setattr(results, "distill", killed)
    with pytest.raises(KeyboardInterrupt):
        results.run(tiny_run)
    assert sorted(f.name for f in (first_dir / "rows").iterdir()) == ["teacher.json", "xnor.json"]
    monkeypatch.setattr(results, "distill", real_distill)

    evaluated = []
    real_evaluate = results.evaluate_row

    def spy(model, *args, **kwargs):
        row = real_evaluate(model, *args, **kwargs)
        evaluated.append(row)
        return row

    monkeypatch.setattr(results, "evaluate_row", spy)
    with open_dict(tiny_run):
        tiny_run.resume_dir = str(first_dir)
        tiny_run.paths.output_dir = str(tmp_path / "second")
    out = results.run(tiny_run)
    assert len(evaluated) == 1  # only the trained row ran
    assert out["settings"]["reused_rows"] == ["teacher", "xnor"]
    first = {f.stem: json.loads(f.read_text())["row"] for f in (first_dir / "rows").iterdir()}
    rows = {r["key"]: r for r in out["rows"]}
    assert rows["teacher"] == first["teacher"] and rows["xnor"] == first["xnor"]
    second = Path(tiny_run.paths.output_dir)
    assert sorted(f.name for f in (second / "rows").iterdir()) == [
        "onebit.json", "teacher.json", "xnor.json"
    ]  # fmt: skip
    assert "| teacher |" not in (second / "results.md").read_text()  # labels, not keys
    assert [r["key"] for r in json.loads((second / "results.json").read_text())["rows"]] == [
        "teacher", "xnor", "onebit"
    ]  # fmt: skip

    # the export is the row's student: the same perplexity on the same tokens
    from onebit.models import ModelSpec, load_causal_lm, load_tokenizer
    from onebit.train.build import container

    spec = ModelSpec.from_dict(container(tiny_run.model))
    teacher, tok = load_causal_lm(spec).eval(), load_tokenizer(spec)
    _, held_out = results.load_data(tiny_run, spec, tok)
    streams = results.eval_streams(tiny_run, teacher, tok, held_out)
    student = load_onebit(second / "students" / "onebit")
    again = real_evaluate(student, tok, streams, tiny_run, False)
    want = rows["onebit"]["ppl"]["generated"]["ppl"]
    assert again["ppl"]["generated"]["ppl"] == pytest.approx(want, rel=1e-4)

    # another setting of the trained row: it runs again, the untrained rows are still reused
    evaluated.clear()
    with open_dict(tiny_run):
        tiny_run.resume_dir = str(second)
        tiny_run.paths.output_dir = str(tmp_path / "third")
        tiny_run.train.steps = 8
        tiny_run.save_students = False
    out = results.run(tiny_run)
    assert out["settings"]["reused_rows"] == ["teacher", "xnor"] and len(evaluated) == 1
    assert not (tmp_path / "third" / "students").exists()


def test_rows_saved_before_an_option_existed_are_reused_at_its_old_behaviour(
    tiny_run: DictConfig, tmp_path
) -> None:
    """A row file saved before ``loss.attention_weight`` existed matches a run with 0 (what the
    code did then), not one with another value; any other missing or extra key still differs."""
    with open_dict(tiny_run):
        tiny_run.rows = ["onebit"]
        tiny_run.resume_dir = str(tmp_path)
    settings = results.row_settings(tiny_run, "onebit")
    assert settings["loss"]["attention_weight"] == 0.0
    old = json.loads(json.dumps(settings))
    del old["loss"]["attention_weight"]
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "onebit.json").write_text(json.dumps({"settings": old, "row": {"k": 1}}))
    assert results.finished_rows(tiny_run, ["onebit"]) == {"onebit": {"k": 1}}
    with open_dict(tiny_run):
        tiny_run.loss.attention_weight = 3.0
    assert results.finished_rows(tiny_run, ["onebit"]) == {}
    assert results._differences(old, results.row_settings(tiny_run, "onebit")) == [
        "loss.attention_weight"
    ]
    assert results._differences({"loss": {}}, {"loss": {"temperature": 1.0}}) == [
        "loss.temperature"
    ]
    assert results._differences(settings, old) == ["loss.attention_weight"]


def test_resume_dir_without_rows_is_one_sentence(tiny_run: DictConfig, tmp_path) -> None:
    with open_dict(tiny_run):
        tiny_run.resume_dir = str(tmp_path)
    with pytest.raises(OneBitInputError, match=r"resume_dir=.* has no rows/ folder"):
        results.run(tiny_run)
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "teacher.json").write_text("{")
    with pytest.raises(OneBitInputError, match=r"teacher\.json is not a row file"):
        results.run(tiny_run)


def test_zero_shot_margin_over_the_best_untrained_row() -> None:
    def row(key: str, accs: list[float], train: dict | None = None) -> dict:
        piqa = {"acc": accs[0], "paper_metric": "acc", "n": 200}
        hella = {"acc": 0.0, "acc_norm": accs[1], "paper_metric": "acc_norm", "n": 200}
        zero_shot = {"piqa": piqa, "hellaswag": hella}
        return {"key": key, "label": key.upper(), "train": train, "zero_shot": zero_shot}

    rows = [
        row("teacher", [0.7, 0.4]),
        row("xnor", [0.5, 0.25]),
        row("svid", [0.55, 0.25]),
        row("onebit", [0.6, 0.3], train={"curve": []}),
    ]
    tasks = ["piqa", "hellaswag"]
    avg, se = results.zero_shot_average(rows[3], tasks)
    assert avg == pytest.approx(45.0)
    assert se == pytest.approx(100 * math.sqrt(0.6 * 0.4 / 199 + 0.3 * 0.7 / 199) / 2)
    b, b_se = results.zero_shot_average(rows[2], tasks)
    (line,) = results.zero_shot_margins(rows, tasks)
    z = (avg - b) / math.hypot(se, b_se)
    assert line.startswith("- zero-shot: ONEBIT averages 45.0 ± ")
    assert f"against {b:.1f} ± {b_se:.1f} for the best untrained 1-bit row (SVID)" in line
    assert line.endswith(f"{avg - b:+.1f} points, {z:+.1f} standard errors of the difference")
    # the table's cells and Avg. are the same per-task paper metrics (acc_norm for HellaSwag)
    assert results.task_scores(rows[3], tasks) == [0.6, 0.3]
    assert "| ONEBIT | 30.0 | 60.0 | 45.0 |" in results.markdown_table(rows, [], tasks)
    rows[3]["zero_shot"].pop("piqa")  # a row without every task has no average
    assert results.task_scores(rows[3], tasks) == [None, 0.3]
    assert "| ONEBIT | 30.0 | - | - |" in results.markdown_table(rows, [], tasks)
    assert results.zero_shot_average(rows[3], tasks) is None
    assert results.zero_shot_margins(rows, tasks) == []
    assert results.UNTRAINED_ONEBIT == ("xnor", "svid", "svid_no_ln")


@pytest.fixture
def step_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The input_ids shape of every ``OneBitDistillation.training_step`` call, in order."""
    from onebit.train.module import OneBitDistillation

    calls = []
    real = OneBitDistillation.training_step

    def spy(self, batch, batch_idx):
        calls.append(tuple(batch["input_ids"].shape))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(OneBitDistillation, "training_step", spy)
    return calls


def test_trained_rows_run_the_lightning_module_that_train_py_runs(
    tiny_run: DictConfig, step_shapes
) -> None:
    """One training recipe: each step of a row is ``OneBitDistillation.training_step``."""
    with open_dict(tiny_run):
        tiny_run.rows = ["onebit"]
        tiny_run.baselines = []
    train = results.run(tiny_run)["rows"][0]["train"]
    assert step_shapes == [(4, 32)] * 16  # train.steps batches of train.batch_size x data.seq_len
    assert train["steps"] == 16 and train["tokens"] == 16 * 4 * 32


def test_long_steps_are_spread_among_the_rows_own(tiny_run: DictConfig, step_shapes) -> None:
    """``train.long_steps``: that many more steps on longer sequences of the same text, spread
    evenly among the row's own steps, every one a training step of the same run."""
    with open_dict(tiny_run):
        long = {"seq_len": 64, "batch_size": 2, "steps": 2}
        tiny_run.ablations["long"] = {"train": {"steps": 6, "long_steps": long}}
        tiny_run.rows = ["long"]
        tiny_run.baselines = []
    train = results.run(tiny_run)["rows"][0]["train"]
    short, long_ = (4, 32), (2, 64)  # train.batch_size x data.seq_len; the long steps' (2 and 6)
    assert step_shapes == [short, short, long_, short, short, short, long_, short]
    assert train["steps"] == 8 and train["tokens"] == 6 * 4 * 32 + 2 * 2 * 64
    assert [p["step"] for p in train["curve"]] == [0, 8]  # train.eval_every=8: the whole run


def test_a_lever_arm_trains_with_its_own_data_and_calibration(tiny_run: DictConfig) -> None:
    """An arm with gains calibrated before training, other sequences and another batch size."""
    with open_dict(tiny_run):
        tiny_run.ablations["lever"] = {
            "label": "lever",
            "quant": {"output_gain": True, "gain_init": "rms"},
            "keep_massive": 2,
            "data": {"seq_len": 16},
            "train": {"batch_size": 2},
        }
        tiny_run.rows = ["ref", "lever"]
        tiny_run.baselines = []
    rows = {r["key"]: r for r in results.run(tiny_run)["rows"]}
    ref, lever = rows["ref"]["train"], rows["lever"]["train"]
    assert lever["tokens"] == 8 * 2 * 16 and ref["tokens"] == 8 * 4 * 32
    assert lever["calibrate_s"] > 0 and ref["calibrate_s"] == 0
    assert lever["curve"][0]["ppl"] != ref["curve"][0]["ppl"]  # calibrated gains: another start
    assert ref["kept_layers"] == [] and 1 <= len(lever["kept_layers"]) <= 2
    assert lever["model_bits_per_weight"] > ref["model_bits_per_weight"]  # kept layers cost bits


def test_arms_with_their_own_text_and_calibration_length(tiny_run: DictConfig, monkeypatch) -> None:
    """``data.source`` trains a row on other text (here C4 beside the generated base);
    ``data.calibration_seq_len`` calibrates on the same text cut into longer sequences."""
    import onebit.train.module

    seen = []
    real = onebit.train.module.init_from_calibration_

    def spy(teacher, student, config, ids, *args, **kwargs):
        seen.append(tuple(ids.shape))
        return real(teacher, student, config, ids, *args, **kwargs)

    monkeypatch.setattr(onebit.train.module, "init_from_calibration_", spy)
    gains = {"output_gain": True, "gain_init": "rms", "calibration_sequences": 2}
    with open_dict(tiny_run):
        tiny_run.data.c4_path = str(shared_path("data", "c4", "c4_validation_2k.parquet"))
        tiny_run.eval.seqlen = 64  # C4 documents of at most 64 tokens
        tiny_run.ablations["long_calib"] = {
            "quant": gains,
            "data": {"calibration_seq_len": 64},
            "train": {"steps": 2},
        }
        tiny_run.ablations["on_c4"] = {
            "quant": gains,
            "data": {"source": "c4"},
            "train": {"steps": 2},
        }
        tiny_run.rows = ["long_calib", "on_c4"]
        tiny_run.baselines = []
    rows = {r["key"]: r["train"] for r in results.run(tiny_run)["rows"]}
    assert seen == [(2, 64), (2, 32)]  # generated text joined to 64; C4 cut at data.seq_len
    assert rows["long_calib"]["curve"][0]["ppl"] != rows["on_c4"]["curve"][0]["ppl"]


def test_a_blockwise_arm_reconstructs_before_distilling(tiny_run: DictConfig) -> None:
    """An arm with outlier weights and the block-wise stage: its time counts as training time."""
    with open_dict(tiny_run):
        tiny_run.ablations["bw"] = {
            "label": "bw",
            "quant": {"outliers": 4},
            "blockwise": {"steps": 3, "sequences": 8},
            "train": {"steps": 5},
        }
        tiny_run.rows = ["ref", "bw"]
        tiny_run.baselines = []
    rows = {r["key"]: r for r in results.run(tiny_run)["rows"]}
    ref, bw = rows["ref"]["train"], rows["bw"]["train"]
    assert ref["blockwise"] is None and bw["calibrate_s"] > 0
    assert (ref["steps"], bw["steps"]) == (8, 5)  # train.ablation_steps, and the arm's own
    blocks = bw["blockwise"]["blocks"]
    assert len(blocks) == tiny_run_blocks(tiny_run)
    assert all(b["rel_err_after"] < b["rel_err_before"] for b in blocks)
    assert bw["curve"][0]["ppl"] != ref["curve"][0]["ppl"]  # another start
    assert bw["bits_per_weight"] > ref["bits_per_weight"]  # the outlier weights are counted


def tiny_run_blocks(cfg: DictConfig) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model.path).num_hidden_layers


def test_split_perplexity_equals_one_call(stories_path) -> None:
    """The table's perplexity (curve windows + the rest) is the library's one-call number."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    ids = torch.randint(3, 512, (10 * 64,), generator=torch.Generator().manual_seed(0))
    cfg = compose_results(["eval.max_windows=7", "eval.curve_windows=3"])
    row = results.evaluate_row(model, None, {"generated": (ids, 64, 7)}, cfg, zero_shot=False)
    ref = perplexity(model, ids, 64, max_windows=7)
    assert row["ppl"]["generated"]["n_tokens"] == ref.n_tokens == 7 * 63
    assert math.isclose(row["ppl"]["generated"]["ppl"], ref.ppl, rel_tol=1e-12)
    assert math.isclose(row["curve_ppl"], perplexity(model, ids, 64, max_windows=3).ppl)


def test_extra_seqlen_scores_the_same_tokens_in_shorter_windows(stories_path) -> None:
    """eval.extra_seqlen: WikiText-2 also at the training length, on the long windows' tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    tok = AutoTokenizer.from_pretrained(stories_path)
    wiki = shared_path("data", "wikitext2", "wiki.test.raw")
    cfg = compose_results(
        ["eval.datasets=[wikitext2]", "eval.max_windows=3", "eval.curve_windows=1",
         "eval.seqlen=128", "eval.extra_seqlen=32", f"eval.wikitext2_path={wiki}"]
    )  # fmt: skip
    streams = results.eval_streams(cfg, model, tok, None)
    assert list(streams) == ["wikitext2", "wikitext2@32"]
    (long_ids, long_len, cap), (short_ids, short_len, short_cap) = streams.values()
    assert (long_len, cap, short_len, short_cap) == (128, 3, 32, None)
    assert torch.equal(short_ids, long_ids[: 3 * 128])  # the tokens of the 3 long windows
    row = results.evaluate_row(model, tok, streams, cfg, zero_shot=False)
    short = row["ppl"]["wikitext2@32"]
    assert (short["n_windows"], short["n_tokens"], short["seqlen"]) == (12, 12 * 31, 32)
    assert row["ppl"]["wikitext2"]["n_tokens"] == 3 * 127
    assert math.isclose(short["ppl"], perplexity(model, short_ids, 32).ppl, rel_tol=1e-12)
    rows = [{"key": "teacher", "label": "t", "ppl": row["ppl"], "zero_shot": {}, "eval_s": 1.0}]
    assert results.markdown_table(rows, list(streams), []).startswith(
        "| Method | Wiki2 | Wiki2@32 |"
    )
    with pytest.raises(OneBitInputError, match=r"eval\.extra_seqlen=128 must be an integer from 2"):
        results.eval_streams(compose_results(
            ["eval.datasets=[wikitext2]", "eval.seqlen=128", "eval.extra_seqlen=128",
             f"eval.wikitext2_path={wiki}"]), model, tok, None)  # fmt: skip


def test_table_layout_and_ratios() -> None:
    def row(key: str, ppl: float, acc: float | None) -> dict:
        zs = {} if acc is None else {"piqa": {"acc": acc, "paper_metric": "acc"}}
        return {
            "key": key,
            "label": key,
            "ppl": {"wikitext2": {"ppl": ppl}},
            "zero_shot": zs,
            "train": None,
            "eval_s": 1.0,
        }

    rows = [row("teacher", 20.0, 0.65), row("xnor", 2.5e6, 0.5), row("onebit", 100.0, None)]
    table = results.markdown_table(rows, ["wikitext2"], ["piqa"])
    assert table.splitlines()[0] == "| Method | Wiki2 | PIQA | Avg. |"
    assert "| teacher | 20.00 | 65.0 | 65.0 |" in table
    assert "| xnor | 2.50e+06 | 50.0 | 50.0 |" in table
    assert "| onebit | 100.00 | - | - |" in table
    assert "| onebit | 0 | 0 | 0 | 1 | 5 |" in results.budget_table(rows, ["wikitext2"])


def test_plot_is_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    curve = [{"tokens": t, "ppl": p} for t, p in [(0, 1e5), (100, 50.0), (200, 30.0)]]
    result = {
        "settings": {"model": "m", "datasets": ["generated"], "curve_tokens": 62},
        "rows": [
            {"key": "teacher", "label": "teacher", "curve_ppl": 4.0},
            {"key": "xnor", "label": "xnor", "curve_ppl": 1500.0},
            {"key": "onebit", "label": "OneBit", "train": {"curve": curve}},
        ],
    }
    path = results.plot_curves(result, tmp_path / "p.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_data_present_for_smollm2_config() -> None:
    cfg = compose_results(["experiment=results_smollm2_135m"], Path("/tmp"))
    shared_path("data", "wikitext2", "wiki.test.raw")
    assert Path(cfg.eval.c4_path).is_file() and Path(cfg.data.c4_path).is_file()
    assert Path(cfg.eval.zero_shot_data_dir).is_dir()


@pytest.mark.parametrize("gain", [False, True])
def test_frozen_signs_give_identical_outputs_and_restore_the_layer(gain: bool) -> None:
    teacher = tiny_causal_lm("llama")
    q = OneBitConfig(output_gain=gain, outliers=3 if gain else 0)
    student = results.onebit_student(teacher, q)
    with torch.no_grad():  # move some latent weights so that signs differ from the teacher's
        for m in student.modules():
            if isinstance(m, OneBitLinear):
                m.weight.add_(0.02 * torch.randn_like(m.weight))
                if gain:
                    m.out_gain.uniform_(0.5, 3.0)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = student(ids).logits
        with results.frozen_signs(student):
            cached = student(ids).logits
        after = student(ids).logits
    torch.testing.assert_close(cached, ref, rtol=0, atol=0)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert all("forward" not in vars(m) for m in student.modules())


def test_main_row_overrides_leave_the_ablations_on_the_base() -> None:
    cfg = compose_results(["experiment=results_smollm2_135m"])
    main, ab = results.main_arm(cfg), results.ablation_configs(cfg)
    assert main.quant == OneBitConfig(
        output_gain=True,
        gain_init="ls",
        outliers=256,
        output_norm=False,
        sign_init="gptq",
        calibration_sequences=2,
    )  # quant=onebit's layer, calibrated on 2 sequences of the evaluation's length
    assert main.calibration_seq_len == 2048
    assert main.loss == DistillLossConfig(hidden_weight=30.0)  # α = 30, loss=kd's default
    assert main.label == "OneBit, 640 steps"
    assert ab["ref"].quant == OneBitConfig()  # the reference stays the paper's layer and loss
    assert ab["ref"].loss == DistillLossConfig()
    assert ab["ref"].calibration_seq_len is None
    assert main._replace(calibration_seq_len=None, loss=ab["ref"].loss)[2:] == ab["ref"][2:]


def test_main_row_with_a_base_is_that_ablation_with_its_own_overrides(tmp_path) -> None:
    """``main: {base: calib2048, loss: ...}`` resolves to the explicit overrides it replaced, so a
    row saved with those overrides is reused; a bad base is one sentence naming ``main.base``."""
    cfg = compose_results(["experiment=results_smollm2_135m"], tmp_path)
    assert cfg.main.base == "calib2048"
    explicit = {
        "quant": {
            "output_gain": True,
            "gain_init": "ls",
            "outliers": 256,
            "output_norm": False,
            "sign_init": "gptq",
            "calibration_sequences": 2,
        },
        "data": {"calibration_seq_len": 2048},
        "loss": {"hidden_weight": 30.0},
    }  # the experiment's main row before it named a base
    assert results.main_spec(cfg) == explicit
    assert results.row_settings(cfg, "onebit")["row"] == explicit
    with open_dict(cfg):
        cfg.main.label = "mine"
    assert results.main_spec(cfg) == {"label": "mine", **explicit}
    assert results.main_arm(cfg).label == "mine, 640 steps"
    with open_dict(cfg):
        cfg.main.base = "nope"
    with pytest.raises(OneBitInputError, match=r"^main\.base='nope' is not an ablation; valid: "):
        results.main_arm(cfg)
    with open_dict(cfg):
        cfg.main = {"base": "calib2048_alpha10_320"}  # a chain of bases
    assert results.main_arm(cfg).loss.hidden_weight == 10.0
    assert results.main_arm(cfg).steps == 320


def test_the_script_runs_from_any_directory(tmp_path) -> None:
    """``python <clone>/benchmarks/results.py`` started elsewhere finds ``onebit`` (installed by
    ``pip install --no-deps -e .``, no PYTHONPATH, no sys.path edit) and its configs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "results.py"), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "results" in done.stdout
