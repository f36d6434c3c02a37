"""GGUF exports run in llama.cpp and compute what the torch side computes (needs llama-cpp-python).

Tolerances, measured here (tiny model, 40 tokens, F32 KV cache):
* all-F32 export vs the materialised torch model: max |logit diff| ~2e-5 (bound 1e-3); the embedded
  default in F32: 7.5e-5 (slow test, same bound) and identical greedy continuations.
* quantised export vs the same subnet materialised with backend=llamacpp (its torch simulation of
  Q8_0/Q4_0/F16 weights and Q8/F16 activations): mean KL ~1e-6 (bound 1e-4), and at most 5% of the KL
  between llama.cpp and the unquantised subnet (~600x smaller measured). Not zero: llama.cpp's
  non-matmul ops (RMSNorm summed in double, its own expf, RoPE angles) differ from torch in the last
  bits, and Q8 activation rounding turns such an ulp into a code flip now and then. On the embedded
  default with every linear 4-bit: KL 0.006 vs 0.59 unquantised (slow test, bound 0.02 and 5%);
  a 1e-7 relative perturbation of the embedding alone moves torch's own Q8 model by KL ~0.004.
  A random, badly cut subnet of the embedded default is more chaotic still (its own KL under a 1e-6
  input perturbation: 0.09), so the slow test uses a full-depth 4-bit model, not a random subnet.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llama_cpp")

from archquant.backends.llamacpp import LlamaCppBackend  # noqa: E402
from archquant.core.space import SpaceConfig  # noqa: E402
from archquant.engine.gguf_reader import GGUFShapeError  # noqa: E402
from archquant.engine.gguf_writer import export_gguf  # noqa: E402
from archquant.engine.llamacpp import LlamaCppRunner, generate  # noqa: E402
from archquant.models.registry import load_model  # noqa: E402
from archquant.supernet import Arch, build, materialize  # noqa: E402
from archquant.utils.errors import UserError  # noqa: E402

pytestmark = pytest.mark.llamacpp


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row. Shape: ``[S, V]`` x2 -> ``[S]``."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 4})
    with torch.no_grad():  # spread the logits so greedy choices and KL are not dominated by near-ties
        model.model.embed_tokens.weight.mul_(4)
    return model, tok


IDS = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
SUBNETS = [  # gate overrides on top of the widest choices
    {},
    {"hidden": 96, "layers.1.keep": 0, "layers.0.kv_groups": 1, "layers.2.kv_groups": 3, "layers.0.mlp": 64,
     "layers.3.mlp": 192},
    {"hidden": 64, "layers.0.keep": 0, "layers.3.keep": 0, "layers.1.kv_groups": 3, "layers.2.mlp": 128},
]
BITS = {"lm_head.wbits": 4, "layers.0.wbits.qkv": 4, "layers.0.wbits.down": 8, "layers.1.wbits.o": 4,
        "layers.2.wbits.gate_up": 8, "layers.2.wbits.qkv": 8, "layers.3.wbits.gate_up": 4, "layers.3.wbits.down": 4}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("sub", range(len(SUBNETS)))
def test_f32_export_matches_the_materialised_model(tiny, tmp_path, sub):
    model, tok = tiny
    sn = build(model, SpaceConfig(width_multiple=32, group_size=32), backend="torch")
    m = materialize(sn, Arch.from_choices(sn.space, SUBNETS[sub]))
    path = export_gguf(m, tmp_path / "f32.gguf", tokenizer=tok, types={16: "F32"})
    with LlamaCppRunner(path, n_ctx=128, kv_type="f32") as runner:
        lc = runner.logits(IDS)
        assert (lc - _logits(m, IDS)).abs().max() <= 1e-3
        for prompt in ([5, 17, 200, 33], [100, 101, 102, 103, 104, 105], [1]):
            ref = m.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt):]
            assert runner.generate_ids(prompt, 12) == ref.tolist()


@pytest.mark.parametrize("sub", range(len(SUBNETS)))
def test_quantised_export_matches_the_llamacpp_simulation(tiny, tmp_path, sub):
    model, tok = tiny
    sn = build(model, SpaceConfig(width_multiple=32, group_size=32), backend="llamacpp")
    arch = Arch.from_choices(sn.space, {**SUBNETS[sub], **BITS})
    sim = materialize(sn, arch)
    plain = materialize(sn, Arch.from_choices(sn.space, SUBNETS[sub]))  # same shapes, 16-bit everywhere
    path = export_gguf(sim, tmp_path / "q.gguf", tokenizer=tok)
    with LlamaCppRunner(path, n_ctx=128, kv_type="f32") as runner:
        lc = runner.logits(IDS)
    kl_sim, kl_plain = _kl(_logits(sim, IDS), lc), _kl(_logits(plain, IDS), lc)
    assert kl_sim.mean() <= 1e-4
    assert kl_sim.mean() <= 0.05 * kl_plain.mean()  # the simulation explains the quantisation error
    assert (lc.argmax(-1) == _logits(sim, IDS).argmax(-1)).float().mean() >= 0.95


def test_q4_1_and_f32_types_match_the_supernet_simulating_them(tiny, tmp_path):
    model, tok = tiny
    be = LlamaCppBackend(types={16: "F32", 4: "Q4_1"})
    sn = build(model, SpaceConfig(width_multiple=32, group_size=32), backend=be)
    arch = Arch.from_choices(sn.space, {**SUBNETS[1], **BITS})
    sn.set_arch(arch)
    with torch.no_grad():
        ref = sn(torch.tensor([IDS]))[0]
    path = export_gguf(materialize(sn, arch), tmp_path / "q41.gguf", tokenizer=tok, types=be.types)
    with LlamaCppRunner(path, n_ctx=128, kv_type="f32") as runner:
        lc = runner.logits(IDS)
    assert _kl(ref, lc).mean() <= 1e-4


def test_runner_tokenizes_like_the_source_and_times(tiny, tmp_path):
    model, tok = tiny
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    with LlamaCppRunner(path, n_ctx=96, n_batch=64) as runner:
        assert runner.tokenize("hello, world", add_special=False) == tok("hello, world")["input_ids"]
        assert runner.detokenize(tok("abc")["input_ids"]) == "abc"
        assert runner.logits(list(range(80))).shape == (80, 259)  # longer than n_batch: chunked
        dec = runner.time_decode(context=32, tokens=4, warmup=1)
        pre = runner.time_prefill(length=16, repeats=2, warmup=0)
        assert len(dec["samples"]) == 4 and dec["ms"] > 0 and len(pre["samples"]) == 2 and pre["ms"] > 0
        with pytest.raises(ValueError, match="outside the vocabulary"):
            runner.logits([300])
    text = generate(path, "ab", max_new_tokens=5)
    assert isinstance(text, str)


def test_files_that_would_abort_llama_cpp_are_refused_before_loading(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "ffn0.gguf"
    w = GGUFWriter(str(path), "deci")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count([2, 2])
    w.add_head_count_kv([1, 1])
    w.add_feed_forward_length([64, 0])
    w.add_key_length(32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFShapeError, match="layer 1 has feed_forward_length 0"):
        LlamaCppRunner(path)


@pytest.mark.slow
def test_embedded_default_f32_export_and_quantised_subnet(tmp_path):
    from archquant.models.embedded import ensure_embedded_gguf

    model, tok = load_model("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published")["input_ids"]
    src = ensure_embedded_gguf()
    path = export_gguf(model, tmp_path / "f32.gguf", source_gguf=src, types={16: "F32"})
    with LlamaCppRunner(path, n_ctx=128, kv_type="f32") as runner:
        assert (runner.logits(ids) - _logits(model, ids)).abs().max() <= 1e-3
        for prompt in ("The capital of France is", "def fibonacci(n):", "Once upon a time"):
            p = tok(prompt)["input_ids"]
            ref = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(p):]
            assert runner.generate_ids(p, 16) == ref.tolist()
    # every linear 4-bit, lm_head 8-bit: a quantisation error far above the rounding noise of the comparison
    sn = build(model, SpaceConfig(), backend="llamacpp")
    bits = {g: (8 if g == "lm_head.wbits" else 4) for g in sn.space.gates() if "wbits" in g}
    sim = materialize(sn, Arch.from_choices(sn.space, bits))
    plain = materialize(sn, Arch.full(sn.space))
    path = export_gguf(sim, tmp_path / "q.gguf", source_gguf=src)
    with LlamaCppRunner(path, n_ctx=128, kv_type="f32") as runner:
        lc = runner.logits(ids)
    kl_sim, kl_plain = _kl(_logits(sim, ids), lc).mean(), _kl(_logits(plain, ids), lc).mean()
    assert kl_sim <= 0.02 and kl_sim <= 0.05 * kl_plain  # measured: 0.006 vs 0.59


@pytest.mark.slow
def test_generate_answers_from_the_embedded_gguf():
    from archquant.models.embedded import ensure_embedded_gguf

    assert "Paris" in generate(ensure_embedded_gguf(), "The capital of France is", max_new_tokens=6)


def test_generate_serves_the_export_folders_gguf(tiny, tmp_path):
    from archquant.commands.generate import gguf_to_serve

    model, tok = tiny
    folder = tmp_path / "export"
    folder.mkdir()
    path = export_gguf(model, folder / "model.gguf", tokenizer=tok)
    assert gguf_to_serve(str(folder), "auto") == path  # llama-cpp-python is installed here
    assert gguf_to_serve(str(folder), "llamacpp") == path
    assert gguf_to_serve(str(folder), "torch") is None
    assert gguf_to_serve(str(tmp_path / "elsewhere"), "auto") is None  # no GGUF: the packed model runs
    with pytest.raises(UserError, match=r"export.formats=\[packed,gguf\]"):
        gguf_to_serve(str(tmp_path), "llamacpp")


def test_prefix_reusing_scorer_gives_the_loglikelihoods_of_whole_rows(tiny, tmp_path):
    """Zero-shot scoring through llama.cpp reuses the cache of a shared context and projects only the continuation's
    positions; the log-likelihoods equal those of every row decoded from an empty cache (tolerance: the same model's
    logits differ across batch compositions in the last bits, ~1e-5 measured)."""
    from archquant.engine.llamacpp import LlamaCppLM
    from archquant.evaluation.loglik import loglikelihood

    model, tok = tiny
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    requests = [("the cat sat on", " the mat"), ("the cat sat on", " a hat"), ("the cat sat on", " it"),
                ("dogs bark", " loudly at night"), ("dogs bark", " softly"), ("x", " y z"), ("the cat sat", " on")]

    class WholeRows(torch.nn.Module):  # the reference: every row from an empty cache, logits at every position
        def __init__(self, lm):
            super().__init__()
            self.lm, self.config = lm, lm.config

        def forward(self, input_ids):
            return self.lm(input_ids)

    with LlamaCppRunner(path, n_ctx=128, kv_type="f32") as runner:
        lm = LlamaCppLM(runner)
        decoded = []
        decode = runner._ctx.decode
        runner._ctx.decode = lambda batch: (decoded.append(batch.batch.n_tokens), decode(batch))[1]
        fast = loglikelihood(lm, tok, requests)
        reused = sum(decoded)
        decoded.clear()
        ref = loglikelihood(WholeRows(lm), tok, requests, batch_size=1)
        whole = sum(decoded)
    for a, b in zip(fast, ref):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3) and a.greedy == b.greedy and a.num_tokens == b.num_tokens
    assert reused < 0.7 * whole  # the shared contexts were not decoded again


def test_gguf_scores_are_cached_per_window_and_per_task(tiny, tmp_path, monkeypatch):
    """One file's WikiText-2 windows and zero-shot tasks are scored once: a later call that asks for more windows
    scores only the new ones (the cached ones are read back as stored), and agrees with scoring directly."""
    from archquant.data.config import DataConfig
    from archquant.data.files import resolve_data_path
    from archquant.engine.llamacpp import open_gguf_lm
    from archquant.evaluation import gguf_scores
    from archquant.evaluation.perplexity import perplexity

    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    first = gguf_scores.perplexity(path, tok, [3, 1], seq_len=64, log=lambda m: None)
    lm = open_gguf_lm(path, seq_len=64)
    try:
        ref = perplexity(lm, tok, resolve_data_path(DataConfig(), "ppl_file"), seq_len=64, batch_size=1,
                         per_window=True, window_indices=[3, 1])
    finally:
        lm.runner.close()
    assert first["window_nll"] == pytest.approx(ref["window_nll"], rel=1e-6) and first["windows"] == 2
    assert first["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    cache = gguf_scores.cache_path(path, 64)
    rec = gguf_scores.load(cache)
    rec["window_nll"]["1"] = 123.0  # a cached window is read, never recomputed
    cache.write_text(json.dumps(rec))
    more = gguf_scores.perplexity(path, tok, [1, 3, 5], seq_len=64, log=lambda m: None)
    assert more["window_nll"][0] == 123.0 and more["window_nll"][1] == first["window_nll"][0]
    assert sorted(gguf_scores.load(cache)["window_nll"]) == ["1", "3", "5"]
    recorded = gguf_scores.perplexity(path, tok, [5, 3, 1], seq_len=64, score_missing=False)
    assert recorded["unscored"] == 0 and recorded["window_nll"] == [more["window_nll"][i] for i in (2, 1, 0)]
    lacking = gguf_scores.perplexity(path, tok, [1, 2, 4], seq_len=64, score_missing=False)
    assert lacking["unscored"] == 2 and lacking["ppl"] is None and lacking["window_nll"] is None
    whole = gguf_scores.perplexity(path, tok, seq_len=64, score_missing=False)  # None: the whole test
    assert whole["unscored"] == whole["of_windows"] - 3 and whole["ppl"] is None
    assert sorted(gguf_scores.load(cache)["window_nll"]) == ["1", "3", "5"]  # nothing was scored
    with pytest.raises(ValueError, match="outside the"):
        gguf_scores.perplexity(path, tok, [10**7], seq_len=64)
    zs = gguf_scores.zero_shot(path, tok, [("piqa", 3)], seq_len=512, log=lambda m: None)  # byte tokens: long rows
    assert zs["piqa"]["n"] == 3 and "piqa:3" in gguf_scores.load(gguf_scores.cache_path(path, 512))["zero_shot"]
    # a folder of records kept elsewhere ($ARCHQUANT_SCORES) names its file and key, and is what later calls read
    monkeypatch.setenv("ARCHQUANT_SCORES", str(tmp_path / "kept"))
    kept = gguf_scores.cache_path(path, 64)
    assert kept.parent == tmp_path / "kept" and kept.name == cache.name
    gguf_scores.perplexity(path, tok, [1], seq_len=64, log=lambda m: None)
    rec = gguf_scores.load(kept)
    assert rec["file"] == "m.gguf" and rec["key"]["seq_len"] == 64 and list(rec["window_nll"]) == ["1"]
    assert rec["window_nll"]["1"] == pytest.approx(first["window_nll"][1], rel=1e-6)
