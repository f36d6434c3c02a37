"""``archquant-data``: write the data files from the Hugging Face Hub, to prepare an offline machine.

    archquant-data pull /mnt/usb/archquant-data                 # the 7 tasks, perplexity and calibration texts
    archquant-data pull ./data --tasks piqa arc_easy            # some tasks (the texts always come)
    # then, offline:  archquant-eval data.root=/mnt/usb/archquant-data      (or ARCHQUANT_DATA=...)

The folder gets the local layout (``piqa/validation.jsonl``, ``wikitext2_raw/test.txt``, ...), the
names the default ``data`` config reads, so ``data.root=<dir>`` needs no other key. A plain argparse
command: it has no model or run to configure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from archquant.data.benchmarks import TASKS, load_benchmark
from archquant.data.config import CALIB_FILES, DEFAULT_TASK_FILES, DataConfig
from archquant.data.errors import DataFormatError, HubUnavailableError
from archquant.data.files import file_sha256
from archquant.data.hub import HUB_FILES, SAMPLE_SEED, full_file, write_hub_file
from archquant.utils.env import now
from archquant.utils.errors import EXIT_USER_ERROR
from archquant.utils.io import atomic_write_json

MANIFEST = "hub_sources.json"  # per file: hub id, config, split, sample, rows, sha256


def pull_files(tasks: Sequence[str] = TASKS) -> list[str]:
    """The files a pull writes: each task's default file, the full split a sample is drawn from (so a
    whole split can be scored offline too), the perplexity text and the hub's calibration corpus."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"--tasks has unknown task(s) {unknown}; known: {list(TASKS)}")
    files: list[str] = []
    for task in tasks:
        rel = DEFAULT_TASK_FILES[task]
        files += [f for f in (full_file(rel), rel) if f is not None and f not in files]
    calib = next(c for c in CALIB_FILES if c in HUB_FILES)
    return files + [DataConfig().ppl_file, calib]


def pull(out_dir: str | Path, tasks: Sequence[str] = TASKS, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write ``pull_files(tasks)`` under ``out_dir`` from the Hub, each read back through the local loader.

    Files already there are kept (a pull that stopped half way resumes) unless ``force``.

    Returns:
        The manifest written to ``out_dir/hub_sources.json``: ``{"files": {name: {dataset, config,
        split, sample, rows, sha256}}, "datasets", "written"}``.

    Raises:
        HubUnavailableError: the Hub could not be read (no network, ``HF_HUB_OFFLINE=1``).
        DataFormatError: a hub split no longer maps to the local rows.
    """
    import datasets

    out = Path(out_dir).expanduser()
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    for rel in pull_files(tasks):
        path = out / rel
        if path.is_file() and not force:
            log(f"{rel}: already there, kept")
            continue
        spec = HUB_FILES[rel]
        write_hub_file(rel, out)
        if spec.task is not None:  # the local loader reads it back and checks every row's schema
            rows = len(load_benchmark(spec.task, DataConfig(source="hub"), path=path))
        else:
            rows = sum(1 for _ in path.open(encoding="utf-8"))
        sample = None if spec.sample is None else {"rows": spec.sample, "of": full_file(rel), "seed": SAMPLE_SEED}
        manifest["files"][rel] = {
            "dataset": spec.dataset, "config": spec.config, "split": spec.split, "sample": sample,
            "rows": rows, "sha256": file_sha256(path),
        }
        log(f"{rel}: {rows} {'rows' if spec.task else 'lines'} from {spec.dataset} ({spec.config or 'default'}, {spec.split})")
    manifest.update(datasets=datasets.__version__, written=now())
    atomic_write_json(manifest_path, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``archquant-data pull <dir> [--tasks ...] [--force]``; exit status 2 (bad input or no hub) with one message."""
    parser = argparse.ArgumentParser(prog="archquant-data", description="Prepare the data files for an offline machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="write the data files from the Hugging Face Hub into a folder (the local layout)")
    p.add_argument("dir", help="folder to write; then data.root=<dir> (or ARCHQUANT_DATA=<dir>) reads it offline")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), metavar="TASK", help=f"tasks to pull (default: all of {', '.join(TASKS)})")
    p.add_argument("--force", action="store_true", help="rewrite the files already there")
    args = parser.parse_args(argv)
    try:
        manifest = pull(args.dir, args.tasks, force=args.force)
    except (HubUnavailableError, DataFormatError) as err:
        print(f"archquant-data pull: {err}. Run it where the Hugging Face Hub is reachable (and HF_HUB_OFFLINE is unset).", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{len(manifest['files'])} files in {args.dir}; offline: data.root={args.dir} (or ARCHQUANT_DATA={args.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
