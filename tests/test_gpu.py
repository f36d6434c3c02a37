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
    summary = export_model(dcfg, session, model.float().cpu(), res.arch)
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
