"""Generation with a KV cache: our loop equals HF's greedy generate, an export generates what the
student generates, and generate.py prints tokens/s or refuses bad input in one sentence."""

from __future__ import annotations

import subprocess
import sys

import torch

from onebit.export import save_onebit
from onebit.generation import generate
from onebit.models import load_causal_lm, load_tokenizer, tiny_causal_lm
from onebit.quant import OneBitConfig, freeze_, quantize_

from .conftest import REPO


def _trained_student():
    student = freeze_(quantize_(tiny_causal_lm("llama"), OneBitConfig()))
    with torch.no_grad():  # as after training: latent weights and value vectors moved
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return student.eval()


def test_kv_cache_loop_equals_hf_greedy_generate() -> None:
    model = tiny_causal_lm("llama").eval()
    ids = torch.randint(0, 128, (1, 7))
    ours, stats = generate(model, ids, max_new_tokens=12)
    theirs = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(ours, theirs)
    assert stats.prompt_tokens == 7 and stats.new_tokens == 12
    assert stats.decode_tokens_per_s > 0


def test_export_generates_what_the_student_generates(tmp_path) -> None:
    from onebit.export import load_onebit

    student = _trained_student()
    ids = torch.randint(0, 128, (1, 9))
    expected, _ = generate(student, ids, max_new_tokens=16)
    loaded = load_onebit(save_onebit(student, tmp_path / "x", OneBitConfig(), torch.float32))
    got, _ = generate(loaded, ids, max_new_tokens=16)  # through the packed C++ kernel
    assert torch.equal(got, expected)


def test_sampling_is_seeded() -> None:
    model = tiny_causal_lm("llama").eval()
    ids = torch.randint(0, 128, (1, 4))
    a, _ = generate(model, ids, 10, do_sample=True, top_k=20, seed=3)
    b, _ = generate(model, ids, 10, do_sample=True, top_k=20, seed=3)
    assert torch.equal(a, b)


def _cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "generate.py", *overrides, f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_cli_on_a_stories260k_export(stories_path, tmp_path) -> None:
    spec = {"name": "stories260k", "source": "local", "path": str(stories_path)}
    student = freeze_(quantize_(load_causal_lm(spec), OneBitConfig()))
    path = save_onebit(student, tmp_path / "export", OneBitConfig(), tokenizer=load_tokenizer(spec))
    out = _cli(tmp_path, f"path={path}", "max_new_tokens=8", "prompt=Once upon")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[export] prompt" in out.stdout and "decode" in out.stdout and "peak RSS" in out.stdout
    assert "(step decoder)" in out.stdout  # a LLaMA export decodes through onebit.decoder
    fwd = _cli(tmp_path, f"path={path}", "max_new_tokens=8", "prompt=Once upon", "decoder=model")
    assert fwd.returncode == 0 and "(model decoder)" in fwd.stdout
    assert fwd.stdout.split("\n[export]")[0] == out.stdout.split("\n[export]")[0]  # same text
    bad = _cli(tmp_path, f"path={path}", "decoder=fast")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: decoder=fast is not one of auto, step, model."
    )


def test_generate_cli_refuses_a_missing_export(tmp_path) -> None:
    out = _cli(tmp_path, f"path={tmp_path}/nothing")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: path={tmp_path}/nothing does not exist (source=export needs it)."
    )


def test_generate_cli_refuses_decoder_step_for_a_model_it_does_not_run(
    stories_path, tmp_path
) -> None:
    spec = {"name": "stories260k", "source": "local", "path": str(stories_path)}
    tok = load_tokenizer(spec)
    student = freeze_(quantize_(tiny_causal_lm("gpt2", vocab_size=len(tok)), OneBitConfig()))
    path = save_onebit(student, tmp_path / "gpt2", OneBitConfig(), tokenizer=tok)
    out = _cli(tmp_path, f"path={path}", "max_new_tokens=4", "decoder=step")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: decoder=step cannot run this model: model type 'gpt2' (the step decoder runs "
        "llama, mistral, qwen2, qwen3); use decoder=auto or decoder=model."
    )
