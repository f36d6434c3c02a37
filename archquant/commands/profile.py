"""``archquant-profile``: build the latency table of this device for a model, search space, backend and scenario.

    archquant-profile latency.backend=torch latency.scenario=decode          # the committed CPU tables
    archquant-profile latency.backend=torch latency.scenario=prefill
    archquant-profile model=tiny-llama space=tiny latency.backend=torch latency.min_run_time=0.01   # smoke
    archquant-profile model=random:llama-3.1-8b model.dtype=bfloat16 latency.backend=triton latency.device=cuda
"""

from __future__ import annotations

from pathlib import Path

import torch

from archquant.backends import get_backend
from archquant.core.arch import Arch
from archquant.core.space import resolve_space
from archquant.latency.build import profile_table
from archquant.latency.loader import table_path, types_tag
from archquant.latency.model import LatencyModel
from archquant.latency.roofline import measure_roofline, save_roofline
from archquant.latency.scenario import Scenario
from archquant.latency.table import LatencyTable
from archquant.models.registry import load_model
from archquant.utils.env import device_name
from archquant.utils.errors import UserError


def profile(cfg) -> LatencyTable:
    """The ``archquant-profile`` verb: profile, write ``latency_tables/<device>/<model>-<backend>-<scenario>.json``.

    llama.cpp's backend is timed in llama.cpp, the reference backends on this package's runtime.
    """
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    lat = cfg.latency
    if lat.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("latency.device=cuda but no CUDA device is visible; use latency.device=cpu")
    backend = get_backend(lat.backend, lat.backend_options())
    dtype = getattr(torch, cfg.model.dtype)
    model, _ = load_model(cfg.model.name, dtype=dtype, seed=cfg.model.seed, device=lat.device)
    model.eval()
    space = resolve_space(backend.restrict_space(cfg.space, model.config), model.config)
    scenario = Scenario.from_config(lat)
    out = Path(lat.out) if lat.out else table_path(cfg.model.name, backend.name, scenario, lat.device, tag=types_tag(backend))
    print(f"archquant-profile: {cfg.model.name} on {device_name(lat.device)}, backend {backend.name}, "
          f"scenario {scenario.header()}")
    print(space.describe())
    table = profile_table(model, space, backend, scenario, lat)
    table.save(out)
    save_roofline(out.parent / "roofline.json", measure_roofline(lat.device, dtype), lat.device)
    lm = LatencyModel(space, table, backend)
    lo, hi = lm.range_ms()
    print(f"wrote {out} ({sum(len(v) for v in table.ops.values())} entries); "
          f"full model predicted {lm.predict_ms(Arch.full(space)):.3f} ms, space range {lo:.3f}-{hi:.3f} ms")
    return table
