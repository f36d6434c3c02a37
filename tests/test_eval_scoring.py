"""Scoring against hand-computed log-likelihoods, lm-eval's prompt formats, and a direct perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archquant.evaluation import encode_pair, loglikelihood, perplexity
from archquant.evaluation.tasks import TASK_SPECS, MCExample, hellaswag_context
from archquant.evaluation.zero_shot import aggregate, mean_stderr, score_examples
from archquant.models import load_model
from archquant.models.tokenizers import byte_tokenizer


class BigramLM(nn.Module):
    """logits[t] = table[token[t]]: log-likelihoods are closed-form sums of table log-softmax entries.

    Returns a bare tensor (like a supernet), and counts forward rows to check request sharing.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.rows = 0

    def forward(self, ids):  # ids: [B, S] -> [B, S, V]
        self.rows += ids.shape[0]
        return self.table[ids]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bigram(tok):
    torch.manual_seed(0)
    return BigramLM(torch.randn(len(tok), len(tok)) * 2)


def hand_loglik(table, ids_ctx, ids_cont):
    """Closed form: sum over continuation tokens of log softmax(table[previous token])[token]."""
    logp = F.log_softmax(table.double(), dim=-1)
    seq = ids_ctx + ids_cont
    return sum(float(logp[seq[i - 1], seq[i]]) for i in range(len(ids_ctx), len(seq)))


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- loglikelihood


def test_loglikelihood_matches_closed_form(tok, bigram):
    reqs = [("Question: is it?\nAnswer:", " yes"), ("Question: is it?\nAnswer:", " no"), ("ab", "cd"), ("x y", " z w")]
    got = loglikelihood(bigram, tok, reqs, batch_size=3)
    for (ctx, cont), r in zip(reqs, got):
        want = hand_loglik(bigram.table.detach(), ids(tok, ctx), ids(tok, cont))
        assert r.logprob == pytest.approx(want, abs=1e-4)
        assert r.num_tokens == len(ids(tok, cont))


def test_trailing_context_space_moves_to_the_continuation(tok, bigram):
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    [r] = loglikelihood(bigram, tok, [("Answer: ", "yes")])
    assert r.logprob == pytest.approx(hand_loglik(bigram.table.detach(), ids(tok, "Answer:"), ids(tok, " yes")), abs=1e-4)


def test_empty_context_is_the_bos_token(tok, bigram):
    ctx, cont = encode_pair(tok, "", "hi")
    assert ctx == [tok.bos_token_id] and cont == ids(tok, "hi")
    [r] = loglikelihood(bigram, tok, [("", "hi")])
    assert r.logprob == pytest.approx(hand_loglik(bigram.table.detach(), [tok.bos_token_id], ids(tok, "hi")), abs=1e-4)


def test_left_truncation_to_the_model_length(tok, bigram):
    # max_length 6: the input keeps the last 7 tokens of context+continuation, minus the final one
    [r] = loglikelihood(bigram, tok, [("abcdefghij", "klm")], max_length=6)
    full = ids(tok, "abcdefghijklm")[-7:]
    assert r.logprob == pytest.approx(hand_loglik(bigram.table.detach(), full[:4], full[4:]), abs=1e-4)


def test_greedy_flag(tok):
    table = torch.full((len(tok), len(tok)), -10.0)
    a, b = ids(tok, "ab")
    table[a, b] = 10.0  # after 'a' the model is sure of 'b'
    model = BigramLM(table)
    r_ab, r_ac = loglikelihood(model, tok, [("a", "b"), ("a", "c")])
    assert r_ab.greedy and not r_ac.greedy and r_ab.logprob > r_ac.logprob


def test_identical_inputs_share_one_forward_row(tok, bigram):
    bigram.rows = 0
    ctx = "Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    loglikelihood(bigram, tok, [(ctx, f" {c}") for c in "ABCD"], batch_size=16)
    assert bigram.rows == 1  # one-token continuations: the four requests have the same input


def test_batching_does_not_change_results():
    model, tok = load_model("tiny-llama")
    reqs = [("Question: why?\nAnswer:", " because" * k) for k in range(1, 6)] + [("short", " x"), ("a much longer context here", " y")]
    one = [r.logprob for r in loglikelihood(model, tok, reqs, batch_size=1)]
    many = [r.logprob for r in loglikelihood(model, tok, reqs, batch_size=4)]
    np.testing.assert_allclose(one, many, atol=1e-4)  # right padding never leaks into earlier positions


# ---------------------------------------------------------------- multiple-choice metrics


def test_acc_and_acc_norm_known_answers(tok):
    # a uniform model: every token costs log V, so a choice's log-likelihood is -(tokens) log V
    model = BigramLM(torch.zeros(len(tok), len(tok)))
    ex = MCExample(requests=(("Q:", " a"), ("Q:", " abcdef")), gold=1, choices=("a", "abcdef"))
    [s] = score_examples(model, tok, [ex])
    logv = math.log(len(tok))
    assert s.logprobs == pytest.approx((-2 * logv, -7 * logv), abs=1e-4)
    assert s.pred == 0  # acc prefers the shorter continuation
    assert s.pred_norm == 1  # per character of the choice (delimiter excluded): -7/6 log V > -2/1 log V
    assert (s.acc, s.acc_norm) == (0.0, 1.0)


def test_ties_go_to_the_first_choice(tok):
    model = BigramLM(torch.zeros(len(tok), len(tok)))
    ex = MCExample(requests=(("Q:", " x"), ("Q:", " y")), gold=1, choices=("x", "y"))
    [s] = score_examples(model, tok, [ex])
    assert s.pred == 0 and s.pred_norm == 0


def test_aggregate_and_stderr_closed_form(tok):
    model = BigramLM(torch.zeros(len(tok), len(tok)))
    exs = [MCExample(requests=(("Q:", " a"), ("Q:", " bb")), gold=g, choices=("a", "bb")) for g in (0, 0, 1, 0)]
    res = aggregate("piqa", score_examples(model, tok, exs))
    assert res["acc"] == 0.75 and res["acc_norm"] == 0.25 and res["n"] == 4
    assert res["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 4))  # sample var of [1,1,0,1] = 0.25
    assert res["metric"] == "acc_norm" and res["stderr"] == res["acc_norm_stderr"]
    assert aggregate("boolq", score_examples(model, tok, exs))["acc_norm"] is None  # lm-eval reports acc only
    assert mean_stderr([1.0]) is None


# ---------------------------------------------------------------- prompt formats (lm-eval task YAMLs)


def test_prompt_formats_by_hand():
    ex = TASK_SPECS["boolq"].build({"passage": "P -- text", "question": "is it", "label": True})
    assert ex.requests == (("P -- text\nQuestion: is it?\nAnswer:", " no"), ("P -- text\nQuestion: is it?\nAnswer:", " yes"))
    assert ex.gold == 1
    ex = TASK_SPECS["piqa"].build({"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1})
    assert ex.requests == (("Question: g\nAnswer:", " s1"), ("Question: g\nAnswer:", " s2")) and ex.gold == 1
    ex = TASK_SPECS["winogrande"].build(
        {"sentence": "The trophy does not fit in the case because the _ is too big.", "option1": "trophy", "option2": "case", "answer": "1"}
    )
    assert ex.requests == (
        ("The trophy does not fit in the case because the trophy", " is too big."),
        ("The trophy does not fit in the case because the case", " is too big."),
    )
    assert ex.gold == 0
    choices = [{"text": "one", "label": "1"}, {"text": "two", "label": "2"}]  # numeric labels, as in 4% of ARC
    arc = {"id": "x", "question": {"stem": "Why?", "choices": choices}, "answerKey": "2"}
    ex = TASK_SPECS["arc_easy"].build(arc)
    assert ex.requests == (("Question: Why?\nAnswer:", " one"), ("Question: Why?\nAnswer:", " two")) and ex.gold == 1
    ex = TASK_SPECS["mmlu"].build({"subject": "high_school_biology", "question": " Q? ", "choices": ["a", "b", "c", "d"], "answer": "C"})
    ctx = "The following are multiple choice questions (with answers) about high school biology.\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert ex.requests == tuple((ctx, f" {c}") for c in "ABCD") and ex.gold == 2
    ex = TASK_SPECS["hellaswag"].build(
        {
            "activity_label": "Washing hands",
            "ctx": "A man stands at a sink. the man",
            "endings": ["a", "b  c", "x [title] y", "e"],
            "label": "3",
        }
    )
    assert ex.requests[0] == ("Washing hands: A man stands at a sink. The man", " a")
    assert [c for _, c in ex.requests] == [" a", " b c", " x. y", " e"] and ex.gold == 3


@pytest.mark.parametrize(
    "ctx, want",
    [
        ("A man is seen at a sink. the man", "A man is seen at a sink. The man"),  # ActivityNet: ctx_b capitalised
        ("Spray your hair until it is damp.", "Spray your hair until it is damp."),  # WikiHow: ctx_b empty
        ("Fill a bottle. Spray your hair.", "Fill a bottle. Spray your hair."),
        ("they all", "They all"),  # no ctx_a
    ],
)
def test_hellaswag_context_reconstruction(ctx, want):
    assert hellaswag_context(ctx) == want


# ---------------------------------------------------------------- perplexity


def direct_perplexity(model, tok, text, seq_len, max_windows=None):
    ids_ = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = ids_.numel() // seq_len if max_windows is None else min(ids_.numel() // seq_len, max_windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = ids_[w * seq_len : (w + 1) * seq_len][None]
            logits = model(input_ids=x).logits[0]
            nll += float(F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum"))
            count += seq_len - 1
    return math.exp(nll / count), count


TEXT = " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .\n" * 12


def test_perplexity_matches_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))
    model, tok = load_model("tiny-llama")
    want, count = direct_perplexity(model, tok, TEXT, 64)
    got = perplexity(model, tok, TEXT, seq_len=64, batch_size=3)
    assert got["ppl"] == pytest.approx(want, rel=1e-5) and got["tokens"] == count
    assert got["windows"] == len(tok(TEXT, add_special_tokens=False)["input_ids"]) // 64
    path = tmp_path / "wiki.txt"
    path.write_text(TEXT)
    from_file = perplexity(model, tok, str(path), seq_len=64, max_windows=5, batch_size=2)
    assert from_file["ppl"] == pytest.approx(direct_perplexity(model, tok, TEXT, 64, max_windows=5)[0], rel=1e-5)
    assert from_file["windows"] == 5 and from_file["source"] == str(path)


def test_perplexity_of_a_module_returning_a_tensor(tok):
    table = torch.randn(len(tok), len(tok))
    model = BigramLM(table)
    got = perplexity(model, tok, TEXT, seq_len=32)
    x = torch.tensor(ids(tok, TEXT))[: got["windows"] * 32].view(-1, 32)
    want = F.cross_entropy(table[x[:, :-1]].reshape(-1, len(tok)), x[:, 1:].reshape(-1))
    assert got["nll"] == pytest.approx(float(want), rel=1e-5)


def test_perplexity_window_subset_is_those_windows_of_the_whole(tok):
    from archquant.evaluation.perplexity import window_count

    model = BigramLM(torch.randn(len(tok), len(tok)))
    whole = perplexity(model, tok, TEXT, seq_len=32, per_window=True)
    assert window_count(tok, TEXT, 32) == whole["windows"] >= 4
    pick = [3, 0, whole["windows"] - 1]
    part = perplexity(model, tok, TEXT, seq_len=32, per_window=True, window_indices=pick, batch_size=2)
    assert part["windows"] == 3 and part["tokens"] == 3 * 31
    assert part["window_nll"] == pytest.approx([whole["window_nll"][i] for i in pick], rel=1e-6)
    assert part["nll"] == pytest.approx(sum(whole["window_nll"][i] for i in pick) / (3 * 31), rel=1e-6)
    with pytest.raises(ValueError, match="window_indices"):
        perplexity(model, tok, TEXT, seq_len=32, window_indices=[whole["windows"]])


def test_perplexity_bad_input(tok, bigram):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(bigram, tok, "too short", seq_len=512)
    with pytest.raises(ValueError, match="eval.ppl_max_windows"):
        perplexity(bigram, tok, TEXT, seq_len=32, max_windows=0)


def test_paired_bootstrap_of_a_perplexity_difference():
    import math

    import numpy as np

    from archquant.evaluation.bootstrap import paired_ppl_difference

    rng = np.random.default_rng(0)
    base = rng.uniform(600.0, 1400.0, size=200)  # window NLL sums vary a lot between windows ...
    same = paired_ppl_difference(base, base.copy(), 255)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and not same["excludes_zero"]
    worse = base + rng.normal(5.0, 1.0, size=200)  # ... a paired shift of 5 nats per window is tiny beside that
    out = paired_ppl_difference(worse, base, 255)
    expect = math.exp(worse.sum() / (200 * 255)) - math.exp(base.sum() / (200 * 255))
    assert out["diff"] == pytest.approx(expect) and out["ci"][0] <= expect <= out["ci"][1] and out["excludes_zero"]
    flipped = paired_ppl_difference(base, worse, 255)
    assert flipped["ci"][1] < 0 and flipped["diff"] == pytest.approx(-expect)
    noisy = base + rng.normal(0.0, 50.0, size=200)  # no systematic shift: the interval holds 0
    assert not paired_ppl_difference(noisy, base, 255)["excludes_zero"]
    with pytest.raises(ValueError, match="equal-length"):
        paired_ppl_difference(base, base[:-1], 255)
