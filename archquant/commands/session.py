"""What every search-side command loads once: model, space, latency model, teacher targets, supernets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from archquant.backends import Backend, get_backend
from archquant.search.budget import FeasibleRange, check_budget, feasible_range
from archquant.search.teacher import TeacherTargets, cached_teacher_targets
from archquant.core.space import Space, resolve_space
from archquant.utils.env import device_name

log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    """The loaded pieces shared by a search, a ladder of searches, the Pareto evaluation and the main job.

    Build with ``SearchContext.load(cfg)``; calibration targets and supernets are made on first use.
    """

    cfg: object
    model: torch.nn.Module
    tokenizer: object
    backend: Backend
    space: Space
    latency_model: object
    _targets: tuple[TeacherTargets, TeacherTargets] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, cfg) -> SearchContext:
        """Load the model, resolve the space as the backend restricts it, and find the latency model."""
        from archquant.latency import load_table_for
        from archquant.models.registry import load_model

        model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype), seed=cfg.model.seed)
        model.eval()
        backend = get_backend(cfg.latency.backend)
        # the same resolution ``supernet.build`` applies, so budgets are checked against the searched space
        space = resolve_space(backend.restrict_space(cfg.space, model.config), model.config)
        lm = load_table_for(cfg.latency, space, backend)
        log.info("space:\n%s", space.describe())
        log.info("%s", lm.describe() if hasattr(lm, "describe") else lm)
        return cls(cfg=cfg, model=model, tokenizer=tokenizer, backend=backend, space=space, latency_model=lm)

    # ---- budgets -------------------------------------------------------------------------------
    def where(self) -> str:
        """Backend, scenario and device, for messages and plots."""
        lc = self.cfg.latency
        return f"{lc.backend} {lc.scenario}, batch {lc.batch}, on {device_name(lc.device)}"

    def feasible(self) -> FeasibleRange:
        return feasible_range(self.latency_model, self.space)

    def check_budget(self, budget) -> FeasibleRange:
        return check_budget(self.latency_model, self.space, budget, self.where())

    # ---- data and teacher ------------------------------------------------------------------------
    def model_key(self) -> dict:
        m = self.cfg.model
        return {"name": m.name, "dtype": m.dtype, "seed": m.seed, "fingerprint": self.space.fingerprint}

    def targets(self) -> tuple[TeacherTargets, TeacherTargets]:
        """Calibration and held-out blocks with the teacher's top-k targets (disk-cached)."""
        if self._targets is None:
            from archquant.data import calibration_blocks
            from archquant.utils.paths import cache_dir

            out = []
            for split in ("calib", "val"):
                ids = calibration_blocks(self.tokenizer, self.cfg.data, split)
                out.append(
                    cached_teacher_targets(
                        self.model,
                        ids,
                        topk=self.cfg.search.teacher_topk,
                        temperature=self.cfg.search.kd_temperature,
                        model_key=self.model_key(),
                        cache_dir=cache_dir() / "teacher",
                    )
                )
            self._targets = (out[0], out[1])
        return self._targets

    def build_supernet(self):
        """A fresh supernet (importance from the calibration blocks, cached on disk by ``build``)."""
        from archquant.supernet import build

        calib, _ = self.targets()
        sn = build(self.model, self.cfg.space, backend=self.backend, calib_ids=calib.ids)
        if sn.space.gates() != self.space.gates():
            raise RuntimeError("the supernet resolved a different space than the budget check; report this as a bug")
        return sn

    def gguf_source(self) -> Path | None:
        """The GGUF whose tokenizer an exported subnet copies (the embedded default's own file)."""
        from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_gguf

        return ensure_embedded_gguf() if self.cfg.model.name == EMBEDDED_NAME else None
