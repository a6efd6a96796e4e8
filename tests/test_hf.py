"""A OneBit export is a Hugging Face model: after ``import onebit``,
``AutoModelForCausalLM.from_pretrained(export)`` builds the packed layers and equals
``onebit.load_pretrained``; without ``onebit`` transformers refuses it; ``save_pretrained`` round
trips; lm-eval's stock ``HFLM`` scores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import onebit
from onebit import kernels
from onebit.export import load_onebit, save_onebit
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, PackedOneBitLinear, footprint, freeze_, quantize_

from .conftest import REPO, shared_path

# the default layer of train.py (gains, no LayerNorm, outlier weights) and the paper's
LAYERS = {
    "onebit": OneBitConfig(output_gain=True, output_norm=False, outliers=4),
    "paper": OneBitConfig(),
}


def _student(model, quant: OneBitConfig):
    student = freeze_(quantize_(model, quant))
    with torch.no_grad():  # as after training: latent weights and scales moved
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return student.eval()


def _export(tmp_path: Path, arch: str, layer: str = "onebit") -> tuple[Path, torch.nn.Module]:
    student = _student(tiny_causal_lm(arch), LAYERS[layer])
    path = save_onebit(student, tmp_path / f"{arch}_{layer}", LAYERS[layer], dtype=torch.float32)
    return path, student


def _assert_packed_like(model, export: Path) -> None:
    """Exactly the export's quantized modules are packed layers; none is a dense layer."""
    names = json.loads((export / "config.json").read_text())["quantization_config"]["modules"]
    modules = dict(model.named_modules())
    assert names and all(isinstance(modules[n], PackedOneBitLinear) for n in names)
    packed = [n for n, m in modules.items() if isinstance(m, PackedOneBitLinear)]
    assert sorted(packed) == sorted(names)


@pytest.mark.parametrize("layer", ["onebit", "paper"])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_from_pretrained_builds_packed_layers_equal_to_load_pretrained(
    arch: str, layer: str, tmp_path: Path, monkeypatch
) -> None:
    from transformers import AutoModelForCausalLM

    path, student = _export(tmp_path, arch, layer)
    materialised = []  # a dense layer given real weights while loading (none may be)
    reset = torch.nn.Linear.reset_parameters

    def spy(self):
        if not self.weight.is_meta:
            materialised.append(tuple(self.weight.shape))
        return reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    model = AutoModelForCausalLM.from_pretrained(path)
    monkeypatch.undo()
    assert materialised == []
    assert type(model).__name__.startswith("OneBit") and not model.training
    _assert_packed_like(model, path)
    assert footprint(student).quantized_layers == len(
        [m for m in model.modules() if isinstance(m, PackedOneBitLinear)]
    )
    reference = onebit.load_pretrained(path)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad(), kernels.disabled():  # the reference path: bitwise
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(logits, student(ids).logits, atol=0, rtol=0)
    with torch.no_grad():  # the kernel path: the same code on the same tensors
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def _as_format_1(path: Path, model) -> Path:
    """A copy of the export as format 1 wrote it: row-major signs, format_version 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    from onebit.export import file_sha256

    old = path.with_name(path.name + "_v1")
    shutil.copytree(path, old)
    state = load_file(old / "model.safetensors")
    for name, m in model.named_modules():
        if isinstance(m, PackedOneBitLinear):
            state[f"{name}.packed_signs"] = m.row_signs().contiguous()
    save_file(state, old / "model.safetensors", metadata={"format": "pt", "onebit": "1"})
    cfg = json.loads((old / "config.json").read_text())
    cfg["onebit"]["format_version"] = cfg["quantization_config"]["format_version"] = 1
    cfg["onebit"]["weights_sha256"] = file_sha256(old / "model.safetensors")
    (old / "config.json").write_text(json.dumps(cfg))
    return old


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_format_1_exports_with_row_major_signs_still_load(arch: str, tmp_path: Path) -> None:
    """Exports before the tiled layout (format 1) load through both loaders, tiled as they load,
    on shapes that pad the tiles (40 rows, 40 columns)."""
    from transformers import AutoModelForCausalLM

    size = {"intermediate_size": 40} if arch == "llama" else {"n_inner": 40}
    student = _student(tiny_causal_lm(arch, **size), LAYERS["onebit"])
    path = save_onebit(student, tmp_path / arch, LAYERS["onebit"], dtype=torch.float32)
    assert json.loads((path / "config.json").read_text())["onebit"]["format_version"] == 2
    current = load_onebit(path)
    old = _as_format_1(path, current)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = current(ids).logits
        for model in (load_onebit(old), AutoModelForCausalLM.from_pretrained(old)):
            tiled = {n: m.packed_signs for n, m in model.named_modules()
                     if isinstance(m, PackedOneBitLinear)}  # fmt: skip
            assert tiled and all(t.dim() == 4 for t in tiled.values())
            assert all(torch.equal(t, current.get_submodule(n).packed_signs)
                       for n, t in tiled.items())  # fmt: skip
            torch.testing.assert_close(model(ids).logits, ref, atol=0, rtol=0)


def test_stories260k_from_pretrained_equals_load_pretrained(stories_path, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    student = _student(AutoModelForCausalLM.from_pretrained(stories_path), LAYERS["onebit"])
    path = save_onebit(student, tmp_path / "e", LAYERS["onebit"], dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(path)
    _assert_packed_like(model, path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad(), kernels.disabled():
        torch.testing.assert_close(model(ids).logits, load_onebit(path)(ids).logits, atol=0, rtol=0)


def test_dtype_and_device_map_are_honoured(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path, _ = _export(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PackedOneBitLinear)
    assert layer.packed_signs.dtype == torch.uint8 and layer.outlier_index.dtype == torch.int32
    assert layer.in_scale.dtype == layer.out_gain.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    reference = load_onebit(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad(), kernels.disabled():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_without_onebit_transformers_refuses_the_export(tmp_path) -> None:
    path, _ = _export(tmp_path, "llama")
    code = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "model type `onebit_llama` but Transformers does not recognize" in done.stderr


def test_save_pretrained_round_trip_is_bitwise(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    path, _ = _export(tmp_path, "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "onebit_qwen2"
    assert (
        config["quantization_config"]
        == json.loads((path / "config.json").read_text())["quantization_config"]
    )
    assert "weights_sha256" not in config["onebit"]  # the export's checksum is not the re-save's
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(b[k].dtype == a[k].dtype for k in a)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    loaded = load_onebit(tmp_path / "again")  # our loader reads the re-saved folder too
    with torch.no_grad(), kernels.disabled():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_the_export_has_a_model_card(tmp_path) -> None:
    student = _student(tiny_causal_lm("llama"), LAYERS["onebit"])
    path = save_onebit(
        student,
        tmp_path / "e",
        LAYERS["onebit"],
        card={"base": "org/base-model", "command": "python train.py x=1", "metrics": {"ppl": 3.5}},
    )
    card = (path / "README.md").read_text()
    report = footprint(student)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# base-model: OneBit 1-bit student" in card and "`org/base-model` (llama)" in card
    assert f"| bits per quantized weight | {report.bits_per_weight:.4f} |" in card
    assert "python train.py x=1" in card and "| `ppl` | 3.5 |" in card
    assert "`outliers=4`" in card and "AutoModelForCausalLM.from_pretrained" in card


@pytest.fixture(scope="module")
def stories_export(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = shared_path("models", "stories260K-hf")
    student = _student(AutoModelForCausalLM.from_pretrained(src), LAYERS["onebit"])
    out = tmp_path_factory.mktemp("hf") / "stories"
    return save_onebit(
        student, out, LAYERS["onebit"], torch.float32, AutoTokenizer.from_pretrained(src)
    )


def test_lm_eval_hflm_scores_an_export_like_evaluate_py(stories_export: Path) -> None:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from onebit.eval.zeroshot import evaluate_lm, zero_shot

    data = shared_path("data")
    lm = HFLM(pretrained=str(stories_export), backend="causal", batch_size=8, device="cpu")
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, PackedOneBitLinear)
    ours = zero_shot(
        load_onebit(stories_export),
        AutoTokenizer.from_pretrained(stories_export),
        ("piqa",),
        data,
        limit=8,
    )
    assert evaluate_lm(lm, ("piqa",), data, limit=8) == ours
    assert ours["piqa"]["n"] == 8


@pytest.mark.slow
def test_the_lm_eval_command_line_scores_an_export(stories_export: Path) -> None:
    from onebit.eval.zeroshot import TASKS_DIR

    data = shared_path("data")
    done = subprocess.run(
        [
            sys.executable, "-m", "onebit.lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={stories_export},backend=causal",
            "--tasks", "onebit_piqa", "--include_path", str(TASKS_DIR),
            "--metadata", json.dumps({"data_dir": str(data)}), "--limit", "8",
            "--batch_size", "8", "--device", "cpu",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("|onebit_piqa"))
    assert "|acc     |" in row
