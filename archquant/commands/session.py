"""``Session``: what the commands load once: the model, the space as the backend restricts it, the latency model.

A command builds one session from its config; the main job passes the same session (and objects: an ``Arch``,
a model) from stage to stage, so the model is loaded once, the space resolved once, the latency table read once
and the supernet that materialises subnets built once. Files are written as records, not read back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from archquant.backends import Backend, get_backend
from archquant.core.arch import Arch
from archquant.core.space import Space, model_fingerprint, resolve_space
from archquant.latency import load_table_for
from archquant.search.budget import FeasibleRange, check_budget, feasible_range
from archquant.search.teacher import TeacherTargets, cached_teacher_targets
from archquant.utils.env import device_name, torch_threads
from archquant.utils.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Session:
    """The loaded pieces shared by every stage of a command.

    Build with ``Session.load(cfg)``; the latency model, calibration targets and supernets are made on first use.
    """

    cfg: Any
    model: nn.Module
    tokenizer: Any
    backend: Backend
    space: Space
    _latency_model: Any = field(default=None, repr=False)
    _targets: tuple[TeacherTargets, TeacherTargets] | None = field(default=None, repr=False)
    _calib_ids: torch.Tensor | None = field(default=None, repr=False)
    _materializer: Any = field(default=None, repr=False)
    _sensitivity: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, cfg) -> Session:
        """Load ``model.name``, resolve the space as the backend restricts it, find the latency model."""
        from archquant.models.registry import load_model

        model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype), seed=cfg.model.seed)
        model.eval()
        backend = get_backend(cfg.latency.backend, cfg.latency.backend_options())
        space = _resolve(backend, cfg.space, model)
        log.info("space:\n%s", space.describe())
        return cls(cfg=cfg, model=model, tokenizer=tokenizer, backend=backend, space=space)

    @property
    def latency_model(self):
        """The latency model of ``latency.*`` for the session's space, read on first use (distillation never
        needs one; a search, the Pareto stage and an export's record do).

        On CPU the table is the one of ``trainer.num_threads`` threads (the count every stage runs and times
        with), whatever torch's count is when this is first read."""
        if self._latency_model is None:
            with torch_threads(self.cfg.trainer.num_threads):
                self._latency_model = load_table_for(self.cfg.latency, self.space, self.backend)
            log.info("%s", self._latency_model.describe())
        return self._latency_model

    # ---- budgets -------------------------------------------------------------------------------
    def where(self) -> str:
        """Backend, scenario and device, for messages and plots."""
        lc = self.cfg.latency
        with torch_threads(self.cfg.trainer.num_threads):
            return f"{lc.backend} {lc.scenario}, batch {lc.batch}, on {device_name(lc.device)}"

    def feasible(self) -> FeasibleRange:
        return feasible_range(self.latency_model, self.space)

    def check_budget(self, budget) -> FeasibleRange:
        return check_budget(self.latency_model, self.space, budget, self.where())

    def predicted(self, arch: Arch) -> dict[str, Any]:
        """The latency model's prediction for ``arch`` (recorded with exports)."""
        return {
            "predicted_ms": float(self.latency_model.predict_ms(arch)),
            "predicted_mb": float(self.latency_model.predict_mb(arch)),
            "backend": self.cfg.latency.backend,
            "scenario": self.cfg.latency.scenario,
            "estimate": bool(getattr(self.latency_model.table, "is_estimate", False)),
        }

    # ---- data and teacher ------------------------------------------------------------------------
    def model_key(self) -> dict:
        m = self.cfg.model
        return {"name": m.name, "dtype": m.dtype, "seed": m.seed, "fingerprint": self.space.fingerprint}

    def calib_ids(self) -> torch.Tensor:
        """The calibration token blocks (importance, search and distillation all read these)."""
        if self._calib_ids is None:
            from archquant.data import calibration_blocks

            self._calib_ids = calibration_blocks(self.tokenizer, self.cfg.data, "calib")
        return self._calib_ids

    def teacher_targets(self, split: str, topk: int, temperature: float) -> TeacherTargets:
        """The teacher's top-k targets on the ``calib`` or ``val`` blocks (disk-cached)."""
        from archquant.data import calibration_blocks
        from archquant.utils.paths import cache_dir

        ids = self.calib_ids() if split == "calib" else calibration_blocks(self.tokenizer, self.cfg.data, split)
        return cached_teacher_targets(self.model, ids, topk=topk, temperature=temperature, model_key=self.model_key(),
                                      cache_dir=cache_dir() / "teacher")

    def targets(self) -> tuple[TeacherTargets, TeacherTargets]:
        """Calibration and held-out targets at the search's top-k and temperature."""
        if self._targets is None:
            sc = self.cfg.search
            self._targets = (self.teacher_targets("calib", sc.teacher_topk, sc.kd_temperature),
                             self.teacher_targets("val", sc.teacher_topk, sc.kd_temperature))
        return self._targets

    def with_space(self, space_cfg) -> Session:
        """The same model, backend and calibration data over another space (``space_cfg``), e.g. with the bits
        fixed at 16 for the ``sequential_search`` baseline."""
        import dataclasses

        return Session(cfg=dataclasses.replace(self.cfg, space=space_cfg), model=self.model, tokenizer=self.tokenizer,
                       backend=self.backend, space=_resolve(self.backend, space_cfg, self.model),
                       _targets=self._targets, _calib_ids=self._calib_ids)

    # ---- supernets and subnets -----------------------------------------------------------------
    def _build(self):
        from archquant.supernet import build

        sn = build(self.model, self.cfg.space, backend=self.backend, calib_ids=self.calib_ids())
        if sn.space.gates() != self.space.gates():
            raise RuntimeError("the supernet resolved a different space than the session; report this as a bug")
        return sn

    def search_supernet(self):
        """A fresh supernet to search: a search fixes gates and drops branches physically, so each search gets
        its own (importance scores are cached on disk, so this costs a copy of the weights)."""
        return self._build()

    def materialize(self, arch: Arch) -> nn.Module:
        """``arch`` cut out of the session's one materialising supernet (built on first use, never searched)."""
        from archquant.supernet import materialize

        arch.check(self.space)
        return materialize(self.materializing_supernet(), arch).eval()

    def materializing_supernet(self):
        """The session's one supernet that materialises subnets (built on first use, never searched)."""
        if self._materializer is None:
            self._materializer = self._build()
        return self._materializer

    def bit_sensitivity(self, val, temperature: float):
        """``search.allocate.measure`` on the materialising supernet at one-hot gates (held-out KD of ``val``),
        once per session: every budget's allocation reads the same measurement."""
        if self._sensitivity is None:
            from tqdm.auto import tqdm

            from archquant.search.allocate import measure
            from archquant.search.objective import held_out_kd

            sn = self.materializing_supernet()
            device = sn.embed_tokens.weight.device

            def kd_of(arch: Arch) -> float:
                probs = sn.arch_probs(arch)
                return held_out_kd(lambda ids: sn(ids, probs), val, temperature, device)

            self._sensitivity = measure(self.space, self.latency_model, kd_of,
                                        progress=lambda it: tqdm(it, desc="bit sensitivity", leave=False))
        return self._sensitivity

    def load_arch(self, path: str | Path | None, key: str) -> Arch:
        """Read an ``arch.json`` (or a run folder holding one) and refuse one made for another model or space.

        Raises:
            UserError: no path given (the message names ``key``).
            ArchError: another base model or space (dimensions named).
        """
        if not path:
            raise UserError(f"{key} is required: pass the arch.json written by archquant-search or archquant-pick "
                            f"({key}=/path/to/arch.json)")
        p = Path(path)
        arch = Arch.load(p / "arch.json" if p.is_dir() else p)
        arch.check_model(model_fingerprint(self.model.config))
        arch.check(self.space)
        return arch

    def gguf_source(self) -> Path | None:
        """The GGUF whose tokenizer an exported subnet copies (the embedded default's own file)."""
        from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_gguf

        return ensure_embedded_gguf() if self.cfg.model.name == EMBEDDED_NAME else None


def _resolve(backend: Backend, space_cfg, model) -> Space:
    """The space ``supernet.build`` searches: ``space_cfg`` as the backend restricts it, resolved for ``model``
    (so budgets are checked against the searched space)."""
    return resolve_space(backend.restrict_space(space_cfg, model.config), model.config)


def load_by_name(name: str, *, dtype: str | torch.dtype = "float32", seed: int = 0):
    """``(model, tokenizer)`` of an export folder (verified against its manifest), a registry name, a local HF
    folder or a hub id.

    Raises:
        UserError: an export folder without a tokenizer; ``ModelNotFoundError`` for an unknown name;
            ``ManifestError`` for an export folder whose files do not match their manifest.
    """
    from archquant.export.packed import load, load_tokenizer
    from archquant.models.registry import load_model

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = Path(name).expanduser()
    if path.is_dir() and (path / "archquant.json").is_file():
        tok = load_tokenizer(path)
        if tok is None:
            raise UserError(f"export folder {path} holds no tokenizer; re-export it with one to evaluate or generate")
        model = load(path)
        return (model if torch_dtype == torch.float32 else model.to(torch_dtype)).eval(), tok
    model, tok = load_model(name, dtype=torch_dtype, seed=seed)
    return model.eval(), tok
