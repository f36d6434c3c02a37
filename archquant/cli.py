"""Hydra entry points. Each command is a thin layer over a Python verb that takes a ``Config``.

``archquant-search budget.latency_ms=25 search.steps=150`` composes ``configs/config.yaml`` with the
overrides, validates it into dataclasses (``archquant.config.Config``) and calls the verb.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# command -> "module:function" taking a validated Config (imported lazily: `--help` stays fast)
COMMANDS: dict[str, str] = {
    "run": "archquant.commands.search:run",
    "search": "archquant.commands.search:search",
    "pareto": "archquant.commands.search:pareto",
    "pick": "archquant.commands.search:pick",
    "distill": "archquant.commands.distill:distill",
    "export": "archquant.commands.export:export",
    "eval": "archquant.commands.eval:evaluate_cli",
    "profile": "archquant.commands.profile:profile",
    "generate": "archquant.commands.export:generate",
}


def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def _entry(command: str) -> None:
    import hydra
    from omegaconf import DictConfig

    from archquant.config import register_configs, to_object

    if not CONFIG_DIR.is_dir():
        sys.exit(f"archquant: config folder {CONFIG_DIR} is missing; install archquant from its source tree (pip install -e .)")
    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def _main(cfg: DictConfig) -> None:
        try:
            config = to_object(cfg)
        except Exception as err:  # validation errors name the override key; print them without a traceback
            sys.exit(f"archquant-{command}: invalid config: {err}")
        _resolve(COMMANDS[command])(config)

    _main()


def run_main() -> None:
    _entry("run")


def search_main() -> None:
    _entry("search")


def pareto_main() -> None:
    _entry("pareto")


def pick_main() -> None:
    _entry("pick")


def distill_main() -> None:
    _entry("distill")


def export_main() -> None:
    _entry("export")


def eval_main() -> None:
    _entry("eval")


def profile_main() -> None:
    _entry("profile")


def generate_main() -> None:
    _entry("generate")
