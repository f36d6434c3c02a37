"""``python -m archquant <command> [overrides...]``: the ``archquant-<command>`` entry points without installed scripts.

    python -m archquant profile model=random:llama-3.1-8b model.dtype=bfloat16 latency.backend=triton latency.device=cuda
"""

from __future__ import annotations

import sys

from archquant.cli import COMMANDS, _entry, _fail


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        _fail("<command>", f"usage: python -m archquant <command> [overrides...]; commands: {', '.join(COMMANDS)}")
    command = sys.argv.pop(1)
    sys.argv[0] = f"archquant-{command}"
    _entry(command)


if __name__ == "__main__":
    main()
