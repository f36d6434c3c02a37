"""Hydra entry points. Each command is a thin layer over a Python verb that takes a ``Config``.

``archquant-search budget.latency_ms=25 search.steps=150`` composes ``configs/config.yaml`` with the
overrides, validates it into dataclasses (``archquant.config.Config``) and calls the verb in
``archquant/commands/<command>.py``. This is the one place where a ``UserError`` becomes a one-line message;
exit codes (README, "Exit codes"): 0 done, 1 a bug (traceback), 2 bad input (config, file, budget),
3 no point meets the SLO (``archquant-pick``, ``archquant-run``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Callable, NoReturn

from archquant.utils.errors import EXIT_OK, EXIT_USER_ERROR, UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# command -> "module:function" taking a validated Config (imported lazily: `--help` stays fast); a verb that
# returns an int sets the exit status
COMMANDS: dict[str, str] = {
    "run": "archquant.commands.run:run",
    "search": "archquant.commands.search:search_job",
    "pareto": "archquant.commands.pareto:pareto_job",
    "pick": "archquant.commands.pick:pick",
    "distill": "archquant.commands.distill:distill",
    "export": "archquant.commands.export:export",
    "eval": "archquant.commands.eval:evaluate_cli",
    "profile": "archquant.commands.profile:profile",
    "generate": "archquant.commands.generate:generate",
}


def _resolve(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def _entry(command: str) -> None:
    import hydra
    from omegaconf import DictConfig

    from archquant.config import register_configs, to_object

    if not CONFIG_DIR.is_dir():
        _fail(command, f"config folder {CONFIG_DIR} is missing; install archquant from its source tree (pip install -e .)")
    register_configs()
    if not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
        # run folders are named after the command (outputs/archquant-search/<date>), not after this module
        sys.argv.append(f"hydra.job.name=archquant-{command}")

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def _main(cfg: DictConfig) -> None:
        try:
            config = to_object(cfg)
        except Exception as err:  # validation errors name the override key; print them without a traceback
            _fail(command, f"invalid config: {err}")
        status = run_verb(command, config)
        if status:
            sys.exit(status)

    _main()


def _fail(command: str, message: str) -> NoReturn:
    print(f"archquant-{command}: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_verb(command: str, config) -> int:
    """Call ``command``'s verb on a validated config; returns its exit status (a ``UserError`` exits with
    ``EXIT_USER_ERROR`` and its one-line message)."""
    try:
        result = _resolve(COMMANDS[command])(config)
    except UserError as err:
        _fail(command, str(err))
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


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
