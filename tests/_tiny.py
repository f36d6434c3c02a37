"""Shared tiny-model fixtures: a small GQA Llama, a matching search space, calibration ids, and the config of a
command run on the tiny model (overrides, composition, budgets inside its feasible range)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.overrides import TorchFunctionMode

from archquant.cli import CONFIG_DIR
from archquant.config import register_configs, to_object
from archquant.core.space import SpaceConfig
from archquant.models.tiny import tiny_llama
from archquant.utils.env import torch_threads

VOCAB = 256

# a command on the tiny model, small enough for the default test run (later overrides of a key win)
TINY_OVERRIDES = [
    "model=tiny-llama",
    "space=tiny",
    "latency=torch_cpu",
    "search=quick",
    "search.steps=40",
    "search.checkpoint_every=10",
    "data.seq_len=32",
    "data.num_calib_blocks=8",
    "data.num_val_blocks=2",
    "trainer.num_threads=1",
    "logger=none",
    "eval.ppl_seq_len=64",
    "eval.ppl_max_windows=2",
]


def compose_config(overrides, out_dir):
    """The validated root ``Config`` a command would get from ``overrides``, writing into ``out_dir``."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=list(overrides))
        cfg.out_dir = str(out_dir)
        return to_object(cfg)


def tiny_feasible():
    """The tiny model's feasible latency range under the pinned roofline (one thread: tiny models gain nothing
    from more)."""
    from archquant.commands.session import Session

    torch.set_num_threads(1)
    return Session.load(compose_config(TINY_OVERRIDES, ".")).feasible()


def budget_between(feasible, frac: float, digits: int = 5) -> float:
    """A latency budget ``frac`` of the way through the feasible range (inside it on any machine's roofline)."""
    return round(feasible.min_ms + frac * (feasible.max_ms - feasible.min_ms), digits)


def tiny_model(seed: int = 0, layers: int = 2, **overrides):
    """A random tiny Llama (hidden 128, MLP 256, 8 query / 4 KV heads of 16) in fp32 eval mode."""
    return tiny_llama(seed=seed, num_hidden_layers=layers, vocab_size=VOCAB, **overrides)


def tiny_space(**overrides) -> SpaceConfig:
    """The default space snapped to multiples of 32 (group size 32) so the tiny model has choices."""
    kwargs = {"width_multiple": 32, "group_size": 32, **overrides}
    return SpaceConfig(**kwargs)


def token_ids(rows: int = 2, seq: int = 16, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Deterministic random token ids. Shape: ``[rows, seq]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=g)


def one_thread():
    """Run tiny models on one intra-op thread (restored afterwards): they gain nothing from more, and on a
    shared, loaded machine thread hand-offs dominate their run time."""
    return torch_threads(1)


class CountLinear(TorchFunctionMode):
    """Counts ``F.linear`` calls inside its ``with`` block (``.calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.calls += 1
        return func(*args, **(kwargs or {}))
