"""The search loop: Gumbel-Softmax gates trained on KD + budget penalties, with the entropy pruner, on Fabric."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from archquant.core.arch import Arch
from archquant.search.budget import Repair, argmax_choices, repair_to_budget
from archquant.search.objective import held_out_kd, hinge_penalty, kd_loss, next_token_ce
from archquant.search.pruner import EntropyPruner
from archquant.search.result import SearchResult
from archquant.search.schedule import penalty_scale, temperature
from archquant.search.teacher import TeacherTargets
from archquant.supernet.linear import ElasticLinear
from archquant.training.loop import FabricLoop
from archquant.utils.errors import UserError

log = logging.getLogger(__name__)

SEARCH_RECORD_VERSION = 1


class SearchSetupError(UserError, ValueError):
    """Settings the search cannot run with (batch vs processes, too few calibration blocks)."""


def _seed(seed: int, a: int, stream: int) -> int:
    """A per-(step, stream) seed: every step's randomness is a pure function of the step, so a resumed
    run draws exactly what the uninterrupted run drew, with no generator state to checkpoint."""
    return (seed * 1_000_003 + a * 7_919 + stream * 104_729) % (2**63 - 1)


def onehot_probs(space, arch: Arch, device=None) -> dict[str, torch.Tensor]:
    """Gate probability vectors that select exactly ``arch`` (what a hard forward of that arch uses)."""
    out = {}
    for name, value in arch.to_choices(space).items():
        opts = space.gates()[name]
        p = torch.zeros(len(opts), device=device)
        p[opts.index(value)] = 1.0
        out[name] = p
    return out


WIDTH_GATES = ("hidden", "kv_groups", "q_per_group", "head_dim", "mlp")


@torch.no_grad()
def add_width_prior(gates, strength: float) -> None:
    """Add ``strength * (1 - k / (K - 1))`` to choice ``k`` of every open width gate (choices widest first)."""
    for name in gates.open_gates():
        if name.rsplit(".", 1)[-1] in WIDTH_GATES:
            logits = gates.logits[gates.index[name]]
            k = logits.numel()
            logits += strength * (1 - torch.arange(k, dtype=logits.dtype, device=logits.device) / (k - 1))


class ArchSearch(FabricLoop):
    """The differentiable search (KD + budget penalties, entropy pruner) as a ``FabricLoop``.

    Per step: sample gate probabilities (Gumbel-Softmax at the annealed tau, noise seeded by the step),
    run ONE vectorised supernet forward on a calibration batch, KD against the cached teacher targets,
    add the squared-hinge penalties on the expected latency and memory (noise-free gate probabilities:
    exactly the expectation over the gates) after warm-up, step Adam on the gate logits (and, with
    ``weight_lr > 0``, on the weights); every ``prune_every`` steps the entropy pruner fixes collapsed
    gates. The supernet is not wrapped in DDP (its structure shrinks as gates are fixed); gradients are
    averaged over processes explicitly, and every process draws the same Gumbel noise, so the gate
    logits stay identical everywhere and every process prunes the same gates.

    Args:
        fabric: a launched Fabric.
        supernet: the ``Supernet`` (contract of ``archquant.supernet``).
        latency_model: ``expected_ms/expected_mb`` (differentiable), ``predict_ms/predict_mb``.
        teacher: calibration blocks + teacher targets.
        cfg: ``SearchConfig``.
        budget: ``BudgetConfig``.
        out_dir: run folder (checkpoints under ``checkpoints/``).
        identity: the flattened config checkpoints must agree with.
        val: held-out blocks + teacher targets for the final ``val_kd`` (optional).
        progress: progress bar on rank 0.
    """

    name = "search"

    def __init__(
        self,
        fabric,
        supernet,
        latency_model,
        teacher: TeacherTargets,
        cfg,
        budget,
        out_dir: str | Path,
        *,
        identity: dict[str, Any],
        val: TeacherTargets | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(
            fabric,
            out_dir,
            max_steps=cfg.steps,
            checkpoint_every=cfg.checkpoint_every,
            identity=identity,
            keep_checkpoints=cfg.keep_checkpoints,
            progress=progress,
        )
        world = fabric.world_size
        if cfg.batch_size % world:
            raise SearchSetupError(
                f"search.batch_size={cfg.batch_size} must be divisible by the number of processes "
                f"(trainer.devices={world}): each process takes an equal share of the batch"
            )
        if len(teacher) < cfg.batch_size:
            raise SearchSetupError(
                f"only {len(teacher)} calibration blocks for search.batch_size={cfg.batch_size}; "
                "raise data.num_calib_blocks or lower search.batch_size"
            )
        self.sn = supernet.to(fabric.device)
        for module in self.sn.modules():
            if isinstance(module, ElasticLinear):
                module.mix_outputs_max_tokens = cfg.mix_outputs_max_tokens
        gates = getattr(self.sn, "gates", None)  # a GateSet (test doubles of the supernet may have none)
        if cfg.width_prior and gates is not None:
            add_width_prior(gates, cfg.width_prior)  # a resume then loads the saved logits over it
        self.space = supernet.space
        self.lm = latency_model
        self.teacher = teacher
        self.val = val
        self.cfg = cfg
        self.budget = budget
        self.pruner = EntropyPruner(cfg.prune_epsilon, cfg.prune_every)
        self.history: list[dict[str, Any]] = []
        self.fixed_log: dict[str, dict[str, Any]] = {}
        self.lam_scale = {"latency": 1.0, "memory": 1.0}  # adaptive multipliers of the penalty weights
        self._t_start = time.perf_counter()
        for p in self.sn.weight_parameters():
            p.requires_grad_(cfg.weight_lr > 0)  # frozen weights: backward only reaches the gate logits
        self.arch_opt = torch.optim.Adam(self.sn.arch_parameters(), lr=cfg.arch_lr)
        self.weight_opt = self._weight_optimizer()

    # ---- pieces --------------------------------------------------------------------------------
    def _weight_optimizer(self):
        if self.cfg.weight_lr <= 0:
            return None
        params = [p for p in self.sn.weight_parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.weight_lr)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.arch_opt, self.weight_opt) if o is not None]

    def batch_rows(self, step: int) -> torch.Tensor:
        """This process's share of step ``step``'s batch: epochs of a seeded permutation, partial tail dropped."""
        n, b = len(self.teacher), self.cfg.batch_size
        per_epoch = n // b
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.cfg.seed, epoch, 2)))
        rows = perm[pos * b : (pos + 1) * b]
        return rows[self.fabric.global_rank :: self.fabric.world_size]

    def tau(self, step: int) -> float:
        return temperature(step, self.cfg.steps, self.cfg.tau_start, self.cfg.tau_end)

    def _gumbel_generator(self, step: int) -> torch.Generator:
        dev = self.sn.arch_parameters()[0].device
        return torch.Generator(device=dev).manual_seed(_seed(self.cfg.seed, step, 1))

    # ---- FabricLoop hooks ----------------------------------------------------------------------
    def training_step(self, step: int):
        cfg = self.cfg
        tau = self.tau(step)
        probs = self.sn.sample_probs(tau, hard=cfg.hard, generator=self._gumbel_generator(step))
        ids, t_lp, t_idx = self.teacher.batch(self.batch_rows(step), self.fabric.device)
        with self.fabric.autocast():
            logits = self.sn(ids, probs=probs)  # [b, S, V]
        kd = kd_loss(logits, t_lp, t_idx, cfg.kd_temperature)
        loss = kd
        metrics: dict[str, float] = {"kd": self._global_mean(kd)}
        if cfg.ce_weight > 0:
            ce = next_token_ce(logits, ids)
            loss = loss + cfg.ce_weight * ce
            metrics["ce"] = self._global_mean(ce)
        p = self.sn.probs()
        exp_ms = self.lm.expected_ms(p)
        exp_mb = self.lm.expected_mb(p)
        lat = hinge_penalty(exp_ms, self.budget.latency_ms)
        mem = hinge_penalty(exp_mb, self.budget.memory_mb)
        scale = penalty_scale(step, cfg.warmup_steps)
        if scale > 0:
            lam_lat = cfg.lambda_latency * self.lam_scale["latency"]
            lam_mem = cfg.lambda_memory * self.lam_scale["memory"]
            loss = loss + scale * (lam_lat * lat + lam_mem * mem)
            self._update_lambdas(float(lat.detach()) > 0, float(mem.detach()) > 0)
        metrics.update(
            lambda_latency=cfg.lambda_latency * self.lam_scale["latency"],
            lambda_memory=cfg.lambda_memory * self.lam_scale["memory"],
            tau=tau,
            lat_penalty=float(lat.detach()),
            mem_penalty=float(mem.detach()),
            expected_ms=float(exp_ms.detach()),
            expected_mb=float(exp_mb.detach()),
        )
        return loss, metrics

    def _global_mean(self, value: torch.Tensor) -> float:
        """A per-process batch statistic averaged over processes (what one process on the whole batch logs)."""
        value = value.detach()
        if self.fabric.world_size > 1:
            value = self.fabric.all_reduce(value, reduce_op="mean")
        return float(value)

    def _update_lambdas(self, lat_violated: bool, mem_violated: bool) -> None:
        """Grow a penalty's weight while its budget is exceeded, shrink it back (not below 1x) once met."""
        g = self.cfg.lambda_growth
        for key, violated in (("latency", lat_violated), ("memory", mem_violated)):
            s = self.lam_scale[key]
            self.lam_scale[key] = s * (1 + g) if violated else max(1.0, s / (1 + g))

    def optimizer_step(self, step: int) -> None:
        params = list(self.sn.arch_parameters())
        if self.weight_opt is not None:
            params += [p for g in self.weight_opt.param_groups for p in g["params"]]
        self.sync_gradients(params)
        super().optimizer_step(step)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        # Gates are only fixed after warm-up and while every budget is met in expectation: a gate that
        # collapsed while the penalty was still pushing (KD winning so far) could otherwise be locked
        # on a choice the budget cannot afford, with no open gate left to make up for it.
        settled = metrics["lat_penalty"] == 0 and metrics["mem_penalty"] == 0
        fixed = self.pruner(self.sn, step, allow=self._allow_fix) if step >= self.cfg.warmup_steps and settled else {}
        gates = self.space.gates()
        for name, index in fixed.items():
            self.fixed_log[name] = {"index": index, "value": gates[name][index], "step": step}
        open_gates = self.sn.open_gates()
        metrics["open_gates"] = len(open_gates)
        metrics["fixed_now"] = len(fixed)
        self.history.append({"step": step, **metrics})
        if fixed:
            log.debug("step %d: fixed %d gates, %d open", step, len(fixed), len(open_gates))
        if not open_gates:
            self.stop_reason = "all gates fixed"

    def _allow_fix(self, name: str, index: int, fixed: dict[str, int]) -> int:
        """The index to fix ``name`` to: its argmax, except that the last block that could still be kept
        is fixed to "keep" even if its gate collapsed on "skip" (a subnet keeps at least one block)."""
        gates = self.space.gates()
        if not name.endswith(".keep") or gates[name][index] != 0:
            return index
        keeps = [f"layers.{l}.keep" for l in range(self.space.num_layers)]
        others_alive = any(k != name and not (k in fixed and gates[k][fixed[k]] == 0) for k in keeps)
        return index if others_alive else gates[name].index(1)

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "kd": f"{metrics['kd']:.4f}",
            "E[ms]": f"{metrics['expected_ms']:.3g}",
            "E[MB]": f"{metrics['expected_mb']:.3g}",
            "tau": f"{metrics['tau']:.2f}",
            "open": metrics["open_gates"],
            "s/step": f"{metrics['step_s']:.2f}",
        }

    def state_dict(self) -> dict[str, Any]:
        trainable = {n: p.detach().cpu().clone() for n, p in self.sn.named_parameters() if p.requires_grad}
        return {
            "fixed": [[name, rec["index"]] for name, rec in self.fixed_log.items()],
            "fixed_log": self.fixed_log,
            "params": trainable,
            "arch_opt": self.arch_opt.state_dict(),
            "weight_opt": None if self.weight_opt is None else self.weight_opt.state_dict(),
            "history": self.history,
            "lam_scale": dict(self.lam_scale),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # replay the pruner's decisions first: they change parameter shapes
        for name, index in state["fixed"]:
            if name not in self.sn.fixed:
                self.sn.fix_gate(name, int(index))
        named = dict(self.sn.named_parameters())
        unknown = sorted(set(state["params"]) - set(named))
        if unknown:
            raise ValueError(f"checkpoint holds parameters this supernet lacks: {unknown[:5]}")
        with torch.no_grad():
            for n, t in state["params"].items():
                named[n].copy_(t.to(named[n].device))
        self.arch_opt.load_state_dict(state["arch_opt"])
        if self.weight_opt is not None and state["weight_opt"] is not None:
            self.weight_opt.load_state_dict(state["weight_opt"])
        self.fixed_log = dict(state["fixed_log"])
        self.history = list(state["history"])
        self.lam_scale = dict(state["lam_scale"])

    # ---- the result ----------------------------------------------------------------------------
    @torch.no_grad()
    def val_kd(self, arch: Arch, batch_size: int = 4) -> float | None:
        """KD of ``arch`` (hard one-hot gates) to the teacher on the held-out blocks."""
        if self.val is None or len(self.val) == 0:
            return None
        probs = onehot_probs(self.space, arch, device=self.fabric.device)

        def logits_of(ids):
            with self.fabric.autocast():
                return self.sn(ids, probs=probs)

        return held_out_kd(logits_of, self.val, self.cfg.kd_temperature, self.fabric.device, batch_size)

    def result(self) -> SearchResult:
        """The argmax architecture (repaired to the budget when ``search.repair``), its predictions and record."""
        with torch.no_grad():
            probs = {k: v.detach().cpu() for k, v in self.sn.probs().items()}
        choice = argmax_choices(self.space, probs)
        argmax_ms = float(self.lm.predict_ms(Arch.from_choices(self.space, choice)))
        rep = Repair()
        if self.cfg.repair and (self.budget.latency_ms is not None or self.budget.memory_mb is not None):
            choice, rep = repair_to_budget(self.space, self.lm, choice, probs, self.budget, self.sn.open_gates())
            if rep.moves:
                log.info("budget repair moved %d open gates: %s", len(rep.moves), rep.moves)
        arch = Arch.from_choices(self.space, choice)
        ms, mb = float(self.lm.predict_ms(arch)), float(self.lm.predict_mb(arch))
        meets = (self.budget.latency_ms is None or ms <= self.budget.latency_ms * (1 + 1e-6)) and (
            self.budget.memory_mb is None or mb <= self.budget.memory_mb * (1 + 1e-6)
        )
        return SearchResult(
            arch=arch,
            predicted_ms=ms,
            predicted_mb=mb,
            argmax_predicted_ms=argmax_ms,
            meets_budget=meets,
            stop_reason=self.stop_reason or "max_steps",
            steps=self.step,
            history=self.history,
            fixed=self.fixed_log,
            repair_moves=rep.moves,
            val_kd=self.val_kd(arch),
            wall_s=time.perf_counter() - self._t_start,
        )


def run_search(
    supernet,
    latency_model,
    teacher: TeacherTargets,
    cfg,
    budget,
    out_dir: str | Path,
    *,
    fabric=None,
    identity: dict[str, Any] | None = None,
    resume: bool = False,
    val: TeacherTargets | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search ``supernet`` under ``budget``: the Python verb behind ``archquant-search``.

    Args:
        supernet: a built ``Supernet`` (its gates are fixed in place as the search goes).
        latency_model: see ``ArchSearch``.
        teacher: calibration blocks with teacher targets (``cached_teacher_targets``).
        cfg: ``SearchConfig``.
        budget: ``BudgetConfig`` (checked by ``check_budget`` beforehand).
        out_dir: run folder for checkpoints.
        fabric: a launched Fabric (default: one CPU process, no loggers).
        identity: config keys checkpoints must agree with (default: ``cfg`` and ``budget``).
        resume: continue from the latest checkpoint in ``out_dir``.
        val: held-out targets for ``val_kd``.
        progress: progress bar.
    """
    if fabric is None:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1, loggers=[])
    if identity is None:
        from archquant.training.checkpoint import config_identity

        identity = config_identity({"search": cfg, "budget": budget})
        identity = {k: v for k, v in identity.items() if k not in ("search.checkpoint_every", "search.keep_checkpoints")}
    loop = ArchSearch(
        fabric, supernet, latency_model, teacher, cfg, budget, out_dir, identity=identity, val=val, progress=progress
    )
    loop.prepare(resume)
    loop.fit()
    return loop.result()
