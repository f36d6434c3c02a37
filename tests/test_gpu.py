"""The search, distillation, export and the main job on CUDA (tiny model). Skipped, never failed, without CUDA.

These run wherever a GPU is present (``python -m pytest -m gpu``); on the CPU-only CI they are skipped.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import TINY_OVERRIDES, budget_between
from _tiny import compose_config as _cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY_CUDA = TINY_OVERRIDES + ["latency.device=cuda", "trainer=gpu", "search.steps=12", "search.checkpoint_every=6"]



def test_the_width_prior_lands_on_the_logits_device():
    from archquant.search.loop import add_width_prior
    from archquant.supernet.gates import GateSet

    gates = GateSet({"hidden": [64, 48, 32], "layers.0.mlp": [128, 64]}).cuda()
    add_width_prior(gates, 3.0)
    assert all(p.device.type == "cuda" for p in gates.logits)
    probs = gates.probs()
    assert probs["hidden"].argmax().item() == 0 and probs["layers.0.mlp"].argmax().item() == 0


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from archquant.commands.session import Session

    return Session.load(_cfg(TINY_CUDA, tmp_path_factory.mktemp("s")))


def _budget(session, frac):
    return budget_between(session.feasible(), frac)


def test_search_distill_export_and_reload_on_cuda(tmp_path, session):
    from archquant.commands.distill import distill_subnet
    from archquant.commands.export import export_model
    from archquant.commands.search import search_job
    from archquant.export.packed import load

    cfg = _cfg(TINY_CUDA + [f"budget.latency_ms={_budget(session, 0.5)}"], tmp_path)
    res = search_job(cfg, session=session, out_dir=tmp_path / "search", progress=False)
    assert res.steps == 12 and (tmp_path / "search" / "arch.json").exists()
    dcfg = _cfg(TINY_CUDA + ["distill=quick", "distill.steps=2", "distill.batch_size=2", "distill.ppl_windows=1"], tmp_path)
    record, model = distill_subnet(dcfg, session=session, arch=res.arch, out_dir=tmp_path / "distill", progress=False)
    assert record["steps"] == 2
    summary = export_model(dcfg, session, model, res.arch)  # on CUDA, as the main job exports it
    folder = summary["folder"]
    loaded = load(folder).cuda()
    ids = torch.randint(0, 200, (1, 16), device="cuda")
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_main_job_on_cuda(tmp_path, session):
    from archquant.commands.run import main_job

    ov = TINY_CUDA + [f"run.budgets_ms=[{_budget(session, 0.3)},{_budget(session, 0.8)}]", "distill=quick",
                      "distill.steps=2", "distill.batch_size=2", "distill.ppl_windows=1", "eval.tasks=[piqa]",
                      "eval.limit=4", "eval.progress=false", "pareto.timing_max_rounds=3"]
    rec = main_job(_cfg(ov, tmp_path))
    assert len(rec["searches"]) == 2 and rec["stages"]["export"].startswith("done"), rec["stages"]
    assert json.loads((tmp_path / "eval.json").read_text())["full"]["tasks"]["piqa"]["n"] == 4


def test_graph_replayed_decode_matches_eager_decode():
    from archquant.engine.static_decode import StaticDecoder
    from archquant.models.registry import load_model

    model = load_model("tiny-llama")[0].cuda().eval()
    gen = torch.Generator().manual_seed(0)
    prompt, steps = torch.randint(0, 200, (2, 7), generator=gen).cuda(), torch.randint(0, 200, (2, 5), generator=gen).cuda()
    outs = {}
    for graph in (False, True):
        dec = StaticDecoder(model, batch=2, max_len=16, graph=graph)
        dec.prefill(prompt)
        outs[graph] = [dec.step(steps[:, t : t + 1]).clone() for t in range(5)]
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(4, 64), (4, 128), (8, 64)])
@pytest.mark.parametrize("m", [1, 16, 512])
def test_every_cuda_path_computes_the_dequantised_product(bits, group, m):
    import torch.nn.functional as F

    from archquant.kernels.qlinear import QuantLinear

    dev = torch.device("cuda")
    w = (torch.randn(1024, 2048, device=dev) * 0.05).bfloat16()
    ql = QuantLinear.from_float(w, None, wbits=bits, group_size=group)
    x = torch.randn(m, 2048, device=dev, dtype=torch.bfloat16)
    ref = F.linear(x.float(), ql.dequantized_weight(torch.float32))
    paths = ql.applicable_paths(dev, x.dtype)
    assert "dense" in paths and "triton_gemv" in paths
    for p in paths:
        y = ql.run_path(p, x).float()
        assert (y - ref).norm() <= 1e-2 * ref.norm(), p
    assert ql.select_path(dev, m, x.dtype) in paths
