"""Perplexity: the protocol's windows, a uniform model, agreement with a plain reference loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from onebit.errors import OneBitInputError
from onebit.eval.perplexity import c4_ids, perplexity, wikitext2_ids, wikitext2_text, windows
from onebit.models import tiny_causal_lm


class Uniform(nn.Module):
    """Logits all equal: every token has probability 1/vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


def test_uniform_model_perplexity_is_the_vocabulary_size() -> None:
    res = perplexity(Uniform(321), torch.randint(0, 321, (1000,)), seqlen=128)
    assert res.ppl == pytest.approx(321, rel=1e-6)  # float32 log-softmax
    assert res.n_windows == 7 and res.n_tokens == 7 * 127  # tail of 104 tokens dropped


def test_progress_bar_names_its_data_set_and_counts_windows(capsys) -> None:
    ids = torch.randint(0, 321, (1000,))
    quiet = perplexity(Uniform(321), ids, seqlen=128)
    shown = perplexity(Uniform(321), ids, seqlen=128, progress=True, desc="c4 perplexity")
    assert shown == quiet
    err = capsys.readouterr().err
    assert "c4 perplexity" in err and "7/7" in err


def test_windowing_reproduces_a_hand_computed_nll() -> None:
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 128, (25,))
    res = perplexity(model, ids, seqlen=10)  # windows [0,10) and [10,20); tokens 20..24 dropped
    expected, count = 0.0, 0
    with torch.no_grad():
        for begin in (0, 10):
            logits = model(ids[begin : begin + 10].unsqueeze(0)).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            for t in range(1, 10):  # token t of the window, predicted from position t - 1
                expected -= logp[t - 1, ids[begin + t]].item()
                count += 1
    assert res.n_tokens == count == 18
    assert res.nll_sum == pytest.approx(expected, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(expected / count), rel=1e-6)


def test_equals_a_straightforward_reference_loop(stories_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    tok = AutoTokenizer.from_pretrained(stories_path)
    ids = tok("Once upon a time there was a little girl named Lily. " * 40)["input_ids"]
    ids = torch.tensor(ids)
    seqlen = 64
    # the GPTQ loop: mean loss per window times seqlen, over windows * seqlen
    nlls = []
    n = ids.numel() // seqlen
    with torch.no_grad():
        for i in range(n):
            batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            logits = model(batch).logits
            loss = nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(loss * (seqlen - 1))
    reference = math.exp(torch.stack(nlls).sum().item() / (n * (seqlen - 1)))
    assert perplexity(model, ids, seqlen).ppl == pytest.approx(reference, rel=1e-5)


def test_sliding_windows_score_every_token_once() -> None:
    spans = windows(100, 32, stride=8)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, 100))
    assert windows(100, 32, stride=32) == windows(100, 32)
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 128, (100,))
    res = perplexity(model, ids, seqlen=32, stride=8)
    assert res.n_tokens == 99


def test_too_short_text_is_refused() -> None:
    with pytest.raises(OneBitInputError, match="fewer than one window of 64"):
        perplexity(Uniform(5), torch.zeros(10, dtype=torch.long), seqlen=64)


def test_local_wikitext_and_c4_streams(stories_path) -> None:
    from transformers import AutoTokenizer

    from ..conftest import shared_path

    tok = AutoTokenizer.from_pretrained(stories_path)
    wiki = shared_path("data", "wikitext2", "wiki.test.raw")
    text = wikitext2_text(wiki)
    assert "\r" not in text and text.startswith("\n\n = Robert Boulter = \n")
    ids = wikitext2_ids(tok, wiki)
    assert ids.numel() > 100_000
    c4 = shared_path("data", "c4", "c4_validation_2k.parquet")
    a = c4_ids(tok, c4, seqlen=128, n_samples=8, seed=0)
    b = c4_ids(tok, c4, seqlen=128, n_samples=8, seed=0)
    assert a.shape == (8 * 128,) and torch.equal(a, b)  # GPTQ's seeded sampling: reproducible
    assert not torch.equal(a, c4_ids(tok, c4, seqlen=128, n_samples=8, seed=1))


def test_eval_ids_names_an_unknown_data_set_by_its_key() -> None:
    from onebit.errors import OneBitInputError
    from onebit.eval.perplexity import eval_ids

    with pytest.raises(OneBitInputError) as e:
        eval_ids("lambada", None, 128, key="diagnose.text")
    assert str(e.value) == "diagnose.text has 'lambada'; valid: wikitext2, c4, ptb, text."
