"""``FabricLoop``: the step loop that search and distillation share (resume, NaN guard, logging, checkpoints).

A stage subclasses it and supplies the model-specific parts: ``training_step`` (forward, returns the
loss), ``optimizer_step``, ``after_step`` (e.g. the entropy pruner), ``state_dict``/``load_state_dict``.
The loop owns everything else, so a stage never copies it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from archquant.training.checkpoint import CheckpointManager
from archquant.utils.errors import ExistingFileError, MissingFileError, UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


class FabricLoop:
    """A resumable step loop over a Lightning ``Fabric``.

    Args:
        fabric: a launched Fabric (see ``make_fabric``).
        out_dir: the run folder; checkpoints go to ``<out_dir>/checkpoints``.
        max_steps: steps to run in total (a resumed run counts the steps done before).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        identity: flattened config the checkpoints must agree with (``config_identity``).
        keep_checkpoints: how many recent checkpoints to keep.
        progress: show a progress bar on rank 0.
    """

    name = "train"

    def __init__(
        self,
        fabric,
        out_dir: str | Path,
        *,
        max_steps: int,
        checkpoint_every: int,
        identity: dict[str, Any],
        keep_checkpoints: int = 2,
        progress: bool = True,
    ) -> None:
        if max_steps <= 0 or checkpoint_every <= 0:
            raise ValueError(f"max_steps and checkpoint_every must be > 0, got {max_steps}, {checkpoint_every}")
        self.fabric = fabric
        self.out_dir = Path(out_dir)
        self.max_steps = max_steps
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", identity, keep=keep_checkpoints)
        self.step = 0  # completed steps
        self.stop_reason: str | None = None
        self.resumed_from: Path | None = None
        self._saved_step = -1

    # ---- to override ---------------------------------------------------------------------------
    def training_step(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward one step; return the scalar loss (with its graph) and metrics to log."""
        raise NotImplementedError

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimisers ``optimizer_step`` steps by default."""
        return []

    def optimizer_step(self, step: int) -> None:
        """After backward: step every optimiser and clear gradients (override to sync or clip first)."""
        for opt in self.optimizers():
            opt.step()
            opt.zero_grad(set_to_none=True)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """Hook after the optimiser step (may add metrics, or set ``self.stop_reason`` to end early)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the loop stopped (tensors, lists, numbers)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What the progress bar shows after each step."""
        return {"loss": f"{metrics.get('loss', float('nan')):.4g}"}

    # ---- provided ------------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        """Load the latest checkpoint when resuming; refuse to silently overwrite an existing run.

        Raises:
            FileNotFoundError: ``resume`` with no checkpoint in the folder.
            FileExistsError: not ``resume`` but the folder already holds checkpoints.
            ResumeMismatchError: the checkpoint was made with another config (keys named).
        """
        latest = self.ckpt.latest()
        if not resume:
            if latest is not None:
                raise ExistingFileError(
                    f"{self.out_dir} already holds checkpoints ({latest.name}); pass resume={self.out_dir} to "
                    "continue that run, or choose a fresh folder"
                )
            return
        if latest is None:
            raise MissingFileError(f"resume={self.out_dir}: no checkpoint (checkpoints/step-*.ckpt) to resume from")
        step, state = self.ckpt.load(latest)
        self.load_state_dict(state["loop"])
        self.step, self.stop_reason, self._saved_step = step, state.get("stop_reason"), step
        self.resumed_from = latest

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step from rank 0; every rank waits for it."""
        state = {"loop": self.state_dict(), "stop_reason": self.stop_reason}
        path = None
        if self.fabric.is_global_zero:
            path = self.ckpt.save(self.step, state)
        self.fabric.barrier()
        self._saved_step = self.step
        return path

    def sync_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients over processes (data parallel for modules that ``fabric.setup`` does not wrap).

        A module whose structure changes during the loop (the search drops branches) cannot stay inside
        DDP/FSDP, so the search syncs its few trainable tensors here, in one all-reduce.
        """
        if self.fabric.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.fabric.all_reduce(flat, reduce_op="mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _guard(self, loss: torch.Tensor, step: int) -> None:
        """Stop on NaN/inf on any rank, before the optimiser sees it; the last checkpoint stays untouched."""
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        if self.fabric.world_size > 1:
            bad = self.fabric.all_reduce(bad, reduce_op="sum")
        if float(bad) > 0:
            last = self.ckpt.latest()
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"{self.name}: loss is {float(loss.detach()):.4g} (not finite) at step {step}; stopped, {where}. "
                "Lower the learning rate or check the data, then resume from that folder."
            )

    def fit(self) -> int:
        """Run until ``max_steps`` or until ``after_step`` sets ``stop_reason``; return the steps completed."""
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc=self.name,
            disable=not (self.progress and self.fabric.is_global_zero),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        try:
            while self.step < self.max_steps and self.stop_reason is None:
                step = self.step
                t0 = time.perf_counter()
                loss, metrics = self.training_step(step)
                self._guard(loss, step)
                self.fabric.backward(loss)
                self.optimizer_step(step)
                self.step = step + 1
                metrics = {"loss": float(loss.detach()), **metrics, "step_s": time.perf_counter() - t0}
                self.after_step(step, metrics)
                self.fabric.log_dict({k: v for k, v in metrics.items() if _is_number(v)}, step=step)
                bar.update(1)
                bar.set_postfix(self.progress_postfix(metrics), refresh=False)
                if self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.stop_reason is None:
                self.stop_reason = "max_steps"
            if self._saved_step != self.step:
                self.save_checkpoint()
        finally:
            bar.close()
            for logger in self.fabric.loggers:
                logger.save()
        return self.step


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
