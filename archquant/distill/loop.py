"""``DistillLoop``: KD + QAT of a materialised subnet on the shared ``FabricLoop`` (the search's base).

Per step: a batch of calibration blocks, the student's forward in training mode (its ``FakeQuantLinear``
layers fake-quantise weights and activations at the arch's bits with straight-through gradients), the
logit KL to the teacher's cached top-k log-probabilities (``search.objective.kd_loss``, the search's
own loss), optionally next-token CE and a hidden-state MSE through learned projections, then AdamW
with warm-up + cosine learning rate and gradient clipping. Data order and every random draw are
functions of the step, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archquant.search.objective import kd_loss, next_token_ce
from archquant.search.teacher import TeacherTargets
from archquant.training.loop import FabricLoop


def _seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 3 * 104_729) % (2**63 - 1)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def trainable_parameters(model: nn.Module, *, lora: bool, train_embeddings: bool) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` for distillation and return the trained parameters by name.

    Full QAT trains every decoder weight and norm (and the embedding / untied lm_head when asked);
    LoRA trains only the adapters.
    """
    out = []
    for name, p in model.named_parameters():
        if lora:
            train = "lora_" in name
        else:
            emb = "embed_tokens" in name or name.startswith("lm_head") or ".lm_head." in name
            train = train_embeddings or not emb
        p.requires_grad_(train)
        if train:
            out.append((name, p))
    if not out:
        raise ValueError("nothing to train: check distill.lora / distill.train_embeddings")
    return out


class HiddenProjector(nn.Module):
    """One linear map per kept student block from its output to the teacher's at the same original block.

    Hidden sizes and channel orders differ (the supernet permuted and cut the residual channels), so the
    map is learned; it is initialised by least squares on the first batch.
    """

    def __init__(self, sources: list[int], d_student: int, d_teacher: int) -> None:
        super().__init__()
        self.sources = list(sources)
        self.proj = nn.ModuleList([nn.Linear(d_student, d_teacher, bias=False) for _ in sources])

    @torch.no_grad()
    def init_lstsq(self, student_h: list[torch.Tensor], teacher_h: list[torch.Tensor]) -> None:
        for lin, hs, ht in zip(self.proj, student_h, teacher_h):
            a = hs.reshape(-1, hs.shape[-1]).float()  # [T, d_s]
            b = ht.reshape(-1, ht.shape[-1]).float()  # [T, d_t]
            sol = torch.linalg.lstsq(a, b).solution  # [d_s, d_t]
            lin.weight.copy_(sol.T)

    def loss(self, student_h: list[torch.Tensor], teacher_h: list[torch.Tensor]) -> torch.Tensor:
        """Mean over blocks of MSE(P h_s, h_t) / mean(h_t^2) (scale-free across blocks)."""
        terms = []
        for lin, hs, ht in zip(self.proj, student_h, teacher_h):
            ht = ht.float()
            terms.append(F.mse_loss(lin(hs.float()), ht) / ht.pow(2).mean().clamp(min=1e-8))
        return torch.stack(terms).mean()


class DistillLoop(FabricLoop):
    """KD + QAT (optionally LoRA) of ``student`` against cached teacher targets.

    Args:
        fabric: a launched Fabric.
        student: materialised subnet (``ArchQuantForCausalLM``), or its peft-wrapped form for LoRA.
        targets: calibration blocks + teacher top-k log-probabilities.
        cfg: ``DistillConfig``.
        out_dir: run folder (checkpoints under ``checkpoints/``).
        identity: flattened config checkpoints must agree with.
        teacher: the teacher model, needed only for the hidden-state loss.
        val: held-out blocks + teacher targets for ``evaluate``.
        progress: progress bar on rank 0.
    """

    name = "distill"

    def __init__(self, fabric, student: nn.Module, targets: TeacherTargets, cfg, out_dir: str | Path, *,
                 identity: dict[str, Any], teacher: nn.Module | None = None, val: TeacherTargets | None = None,
                 progress: bool = True) -> None:
        super().__init__(fabric, out_dir, max_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                         identity=identity, keep_checkpoints=cfg.keep_checkpoints, progress=progress)
        world = fabric.world_size
        if cfg.batch_size % world:
            raise ValueError(f"distill.batch_size={cfg.batch_size} must be divisible by trainer.devices={world}")
        if len(targets) < cfg.batch_size:
            raise ValueError(f"only {len(targets)} calibration blocks for distill.batch_size={cfg.batch_size}; "
                             "raise data.num_calib_blocks or lower distill.batch_size")
        if cfg.hidden_weight > 0 and teacher is None:
            raise ValueError("distill.hidden_weight > 0 needs the teacher model")
        self.cfg = cfg
        self.student = student.to(fabric.device)
        self.targets, self.val = targets, val
        self.teacher = None if teacher is None else teacher.to(fabric.device).eval()
        self.named_trainable = trainable_parameters(self.student, lora=cfg.lora.enabled, train_embeddings=cfg.train_embeddings)
        self.projector = None
        if cfg.hidden_weight > 0:
            conf = self._base().config
            self.projector = HiddenProjector(list(conf.layer_source), conf.hidden_size, teacher.config.hidden_size).to(fabric.device)
            self._projector_ready = False
        params = [p for _, p in self.named_trainable] + ([] if self.projector is None else list(self.projector.parameters()))
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history: list[dict[str, Any]] = []

    def _base(self) -> nn.Module:
        """The ``ArchQuantForCausalLM`` under a peft wrapper (or the model itself)."""
        m = self.student
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    # ---- data ----------------------------------------------------------------------------------
    def batch_rows(self, step: int) -> torch.Tensor:
        """This process's rows of step ``step``: epochs of a seeded permutation, partial tail dropped."""
        n, b = len(self.targets), self.cfg.batch_size
        epoch, pos = divmod(step, n // b)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.cfg.seed, epoch)))
        return perm[pos * b : (pos + 1) * b][self.fabric.global_rank :: self.fabric.world_size]

    def _teacher_hidden(self, ids: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            hs = self.teacher(input_ids=ids, output_hidden_states=True).hidden_states  # L+1 x [b, S, d_t]
        return [hs[s + 1] for s in self.projector.sources]

    # ---- FabricLoop hooks ----------------------------------------------------------------------
    def training_step(self, step: int):
        cfg = self.cfg
        lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.student.train()
        ids, t_lp, t_idx = self.targets.batch(self.batch_rows(step), self.fabric.device)
        want_hidden = self.projector is not None
        captured: list[torch.Tensor] = []
        hooks = []
        if want_hidden:  # block outputs of the student (its forward does not return hidden states)
            hooks = [blk.register_forward_hook(lambda _m, _a, out: captured.append(out))
                     for blk in self._base().model.layers]
        try:
            with self.fabric.autocast():
                logits = self.student(input_ids=ids, use_cache=False).logits  # [b, S, V]
        finally:
            for h in hooks:
                h.remove()
        kd = kd_loss(logits, t_lp, t_idx, cfg.kd_temperature)
        loss = kd
        metrics: dict[str, float] = {"kd": float(kd.detach()), "lr": lr}
        if cfg.ce_weight > 0:
            ce = next_token_ce(logits, ids)
            loss = loss + cfg.ce_weight * ce
            metrics["ce"] = float(ce.detach())
        if want_hidden:
            s_h = captured
            t_h = self._teacher_hidden(ids)
            if not self._projector_ready:
                self.projector.init_lstsq(s_h, t_h)
                self._projector_ready = True
            hid = self.projector.loss(s_h, t_h)
            loss = loss + cfg.hidden_weight * hid
            metrics["hidden"] = float(hid.detach())
        return loss, metrics

    def optimizer_step(self, step: int) -> None:
        params = [p for g in self.opt.param_groups for p in g["params"]]
        self.sync_gradients(params)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.cfg.eval_every and (step + 1) % self.cfg.eval_every == 0 and self.val is not None:
            metrics.update({f"val_{k}": v for k, v in self.evaluate().items()})
        self.history.append({"step": step, **metrics})

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        out = {"kd": f"{metrics['kd']:.4f}", "lr": f"{metrics['lr']:.2g}", "s/step": f"{metrics['step_s']:.2f}"}
        if "val_kd" in metrics:
            out["val_kd"] = f"{metrics['val_kd']:.4f}"
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {n: p.detach().cpu().clone() for n, p in self.named_trainable},
            "projector": None if self.projector is None else self.projector.state_dict(),
            "projector_ready": getattr(self, "_projector_ready", False),
            "opt": self.opt.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        named = dict(self.named_trainable)
        unknown = sorted(set(state["params"]) ^ set(named))
        if unknown:
            raise ValueError(f"checkpoint parameters do not match this student: {unknown[:5]}")
        with torch.no_grad():
            for n, t in state["params"].items():
                named[n].copy_(t.to(named[n].device))
            if self.projector is not None and state["projector"] is not None:
                self.projector.load_state_dict(state["projector"])
                self._projector_ready = bool(state["projector_ready"])
        self.opt.load_state_dict(state["opt"])
        self.history = list(state["history"])

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch_size: int = 4) -> dict[str, float]:
        """Held-out KD to the teacher and perplexity of the held-out blocks (student in eval mode)."""
        if self.val is None or len(self.val) == 0:
            return {}
        was_training = self.student.training
        self.student.eval()
        kd_sum = nll_sum = 0.0
        n_blocks = n_tokens = 0
        for start in range(0, len(self.val), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(self.val)))
            ids, t_lp, t_idx = self.val.batch(rows, self.fabric.device)
            logits = self.student(input_ids=ids, use_cache=False).logits
            kd_sum += float(kd_loss(logits, t_lp, t_idx, self.cfg.kd_temperature)) * len(rows)
            n_blocks += len(rows)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            nll_sum += float(nll)
            n_tokens += ids[:, 1:].numel()
        self.student.train(was_training)
        return {"kd": kd_sum / n_blocks, "ppl": math.exp(nll_sum / n_tokens), "tokens": n_tokens}
