"""The shared Fabric loop: atomic checkpoints with a config check, resume, NaN guard, loggers."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from lightning.fabric import Fabric

from archquant.config import LoggerConfig, TrainerConfig
from archquant.training import (
    CheckpointManager,
    FabricLoop,
    NonFiniteLossError,
    ResumeMismatchError,
    config_identity,
    diff_identity,
    make_fabric,
    make_loggers,
)

torch.set_num_threads(1)


class LinReg(FabricLoop):
    """Least squares on a fixed random problem: small, deterministic, with a closed-form answer."""

    name = "linreg"

    def __init__(self, fabric, out_dir, *, steps=40, every=5, identity=None, nan_at=None, crash_at=None):
        super().__init__(fabric, out_dir, max_steps=steps, checkpoint_every=every, identity=identity or {"lr": 0.1}, progress=False)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.01 * torch.randn(64, generator=g)
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.Adam([self.w], lr=0.1)
        self.nan_at, self.crash_at = nan_at, crash_at
        self.seen: list[int] = []

    def training_step(self, step):
        rows = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:16]
        loss = ((self.x[rows] @ self.w - self.y[rows]) ** 2).mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        self.seen.append(step)
        return loss, {}

    def optimizers(self):
        return [self.opt]

    def after_step(self, step, metrics):
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated kill")

    def state_dict(self):
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])


@pytest.fixture()
def fabric():
    return Fabric(accelerator="cpu", devices=1, loggers=[])


def test_config_identity_flattens_and_ignores_prefixes():
    ident = config_identity({"search": {"steps": 3, "seed": 1}, "out_dir": "x", "logger": {"kind": "csv"}}, ignore=("out_dir", "logger"))
    assert ident == {"search.steps": 3, "search.seed": 1}
    assert diff_identity({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == [
        "b (checkpoint: 2, now: 3)",
        "c (checkpoint: '<absent>', now: 4)",
    ]


def test_checkpoints_are_atomic_keep_the_newest_and_ignore_temporaries(tmp_path):
    mgr = CheckpointManager(tmp_path, {"k": 1}, keep=2)
    for step in (5, 10, 15):
        mgr.save(step, {"v": torch.tensor([float(step)])})
    (tmp_path / ".step-00000020.ckpt.abc.tmp").write_bytes(b"partial write of a killed process")
    assert [p.name for p in mgr.paths()] == ["step-00000010.ckpt", "step-00000015.ckpt"]
    step, state = mgr.load()
    assert step == 15 and state["v"].item() == 15.0


def test_checkpoint_from_another_config_is_refused_naming_the_keys(tmp_path):
    CheckpointManager(tmp_path, {"budget.latency_ms": 10.0, "search.steps": 5}).save(1, {})
    with pytest.raises(ResumeMismatchError, match=r"budget\.latency_ms \(checkpoint: 10\.0, now: 12\.0\)") as err:
        CheckpointManager(tmp_path, {"budget.latency_ms": 12.0, "search.steps": 5}).load()
    assert "search.steps" not in str(err.value)


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, fabric):
    ref = LinReg(fabric, tmp_path / "ref")
    ref.prepare(resume=False)
    ref.fit()
    crashed = LinReg(fabric, tmp_path / "run", crash_at=27)
    crashed.prepare(resume=False)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = LinReg(fabric, tmp_path / "run")
    resumed.prepare(resume=True)
    assert resumed.step == 25  # the last checkpoint before the kill
    resumed.fit()
    assert resumed.seen == list(range(25, 40))
    assert torch.equal(resumed.w, ref.w)  # same trajectory, bit for bit
    # and the fit converged towards the least-squares answer (the loop really trains)
    assert torch.allclose(ref.w, torch.tensor([1.0, -2.0, 0.5]), atol=0.3)


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path, fabric):
    loop = LinReg(fabric, tmp_path, steps=5)
    loop.prepare(resume=False)
    loop.fit()
    with pytest.raises(FileExistsError, match="resume="):
        LinReg(fabric, tmp_path).prepare(resume=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        LinReg(fabric, tmp_path / "empty").prepare(resume=True)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fabric):
    loop = LinReg(fabric, tmp_path, nan_at=7)
    loop.prepare(resume=False)
    with pytest.raises(NonFiniteLossError, match=r"at step 7.*step-00000005\.ckpt"):
        loop.fit()
    step, state = loop.ckpt.load()
    assert step == 5 and torch.isfinite(state["loop"]["w"]).all()
    assert torch.isfinite(loop.w).all()  # the optimiser never saw the NaN


def test_csv_logger_writes_metrics(tmp_path):
    fabric = make_fabric(TrainerConfig(num_threads=1), make_loggers(LoggerConfig(kind="csv"), tmp_path))
    loop = LinReg(fabric, tmp_path, steps=6)
    loop.prepare(resume=False)
    loop.fit()
    (metrics,) = list((tmp_path / "logs").rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert all(float(r["loss"]) >= 0 for r in rows)


def test_wandb_logger_runs_offline_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # make_loggers must switch it off; monkeypatch restores it after
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any attempt to reach a server would fail
    loggers = make_loggers(LoggerConfig(kind="wandb", offline=True), tmp_path, name="t")
    assert os.environ["WANDB_MODE"] == "offline"
    fabric = make_fabric(TrainerConfig(num_threads=1), loggers)
    loop = LinReg(fabric, tmp_path, steps=3)
    loop.prepare(resume=False)
    loop.fit()
    loggers[0].experiment.finish()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_fabric_settings_come_from_trainer_config():
    fabric = make_fabric(TrainerConfig(accelerator="cpu", devices=1, num_threads=1))
    assert fabric.world_size == 1 and fabric.device.type == "cpu"
    assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError, match="no CUDA"):
        if not torch.cuda.is_available():
            make_fabric(TrainerConfig(accelerator="gpu"))
        else:  # pragma: no cover
            raise RuntimeError("no CUDA (skipped: a GPU is present)")
