"""Find the latency table for this device/backend/model/scenario (or fall back to a labelled roofline estimate).

Tables live in ``latency_tables/<device_name()>/<model>-<backend>-<scenario>.json`` at the repository
root (``$ARCHQUANT_LATENCY_TABLES`` overrides the root). A table is matched by its header (backend,
scenario, model fingerprint), not by its file name. A table measured on another device, with other
runtime versions or for another workload is used with a loud warning, or refused under
``latency.strict=true``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

from archquant.backends import Backend, get_backend
from archquant.core.space import Space
from archquant.latency.config import LatencyConfig
from archquant.latency.model import LatencyModel
from archquant.latency.roofline import load_roofline, measure_roofline, roofline_table, save_roofline
from archquant.latency.scenario import Scenario
from archquant.latency.table import LatencyTable, TableError
from archquant.utils.env import device_name, versions
from archquant.utils.errors import MissingFileError
from archquant.utils.paths import cache_dir

TABLES_ENV = "ARCHQUANT_LATENCY_TABLES"


class TableMismatchWarning(UserWarning):
    """A latency table measured elsewhere (device, software versions, workload) is being used."""


def tables_root() -> Path:
    """Root folder of the committed tables (``$ARCHQUANT_LATENCY_TABLES`` or ``<repo>/latency_tables``)."""
    env = os.environ.get(TABLES_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "latency_tables"


def model_slug(name: str) -> str:
    """File-name form of a model name: a registry name as is, a path or hub id by its last component."""
    base = Path(name.rstrip("/")).name or name
    return re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-") or "model"


def _nondefault_types(backend: Backend | None) -> list[str]:
    """A llama.cpp backend's GGUF types that differ from its defaults, widest bit-width first (``[]`` otherwise);
    every quantised type when one sits off its nominal slot (Q4_1 at 5 beside Q4_0), so that
    ``latency.types=[...]`` of this list gives back the same map."""
    from archquant.backends.llamacpp import ALLOWED_TYPES, DEFAULT_TYPES

    types = getattr(backend, "types", None) or {}
    if any(t not in ALLOWED_TYPES.get(b, ()) for b, t in types.items()):
        return [t for b, t in sorted(types.items(), reverse=True) if b < 16]
    return [t for b, t in sorted(types.items(), reverse=True) if DEFAULT_TYPES.get(b) != t]


def types_tag(backend: Backend | None) -> str:
    """``-q6_k-q5_0-q4_1`` for a llama.cpp backend whose types differ from its defaults, else ``""``."""
    return "".join(f"-{t.lower()}" for t in _nondefault_types(backend))


def table_path(model_name: str, backend: str, scenario: Scenario, device: str = "cpu", root: Path | None = None,
               *, tag: str = "") -> Path:
    """Where ``archquant-profile`` writes the table of this model/backend/scenario on ``device``; ``tag``
    (``types_tag``) keeps a llama.cpp table of other GGUF types in its own file."""
    root = tables_root() if root is None else Path(root)
    return root / device_name(device) / f"{model_slug(model_name)}-{backend}{tag}-{scenario.slug()}.json"


def types_problem(table: LatencyTable, backend: Backend, space: Space) -> str | None:
    """Why a llama.cpp table cannot price this space (its GGUF types differ for a bit-width the space uses)."""
    types = getattr(backend, "types", None)
    if not types:
        return None
    from archquant.backends.llamacpp import DEFAULT_TYPES

    # a table without the record predates configurable types: it was profiled with the defaults
    theirs = {int(k): v for k, v in (table.header.get("gguf_types") or DEFAULT_TYPES).items()}
    used = {int(b) for b in space.wbits} | {int(b) for b in space.lm_head_bits}
    diff = {b: (theirs.get(b), types[b]) for b in sorted(used) if theirs.get(b) != types.get(b)}
    if not diff:
        return None
    return ", ".join(f"{b}-bit: table {t!r}, config {c!r}" for b, (t, c) in diff.items())


def runtime_packages(backend: Backend) -> tuple[str, ...]:
    """Packages whose version changes the backend's speed (a backend may declare ``runtime_packages``)."""
    return tuple(getattr(backend, "runtime_packages", ("torch",)))


def _fp_matches(header_fp, fp: dict) -> bool:
    return isinstance(header_fp, dict) and all(header_fp.get(k) == v for k, v in fp.items() if k in header_fp)


def find_tables(space: Space, backend: str, scenario_name: str, device: str = "cpu", root: Path | None = None) -> list[Path]:
    """Tables in this device's folder whose header matches backend, scenario name and model."""
    folder = (tables_root() if root is None else Path(root)) / device_name(device)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            h = json.loads(path.read_text()).get("header", {})
        except (json.JSONDecodeError, OSError):
            continue
        same_model = _fp_matches(h.get("model"), space.fingerprint)
        if h.get("backend") == backend and h.get("scenario") == scenario_name and same_model:
            out.append(path)
    return out


def table_problems(table: LatencyTable, backend: Backend, scenario: Scenario, device: str = "cpu") -> list[str]:
    """Why ``table`` may not describe this machine and workload (empty when it does)."""
    h = table.header
    problems = []
    here = device_name(device)
    if h.get("device") != here:
        problems.append(f"it was profiled on device {h.get('device')!r}, this is {here!r}")
    now_v = versions()
    for pkg in runtime_packages(backend):
        was = (h.get("versions") or {}).get(pkg)
        if was is not None and was != now_v.get(pkg):
            problems.append(f"it was profiled with {pkg} {was}, this has {now_v.get(pkg)}")
    try:
        theirs = Scenario.from_header(h)
    except (KeyError, ValueError):
        problems.append("its header has no valid scenario")
    else:
        if not theirs.same_workload(scenario):
            problems.append(f"it measures {theirs.header()}, the config asks for {scenario.header()}")
    return problems


def _types_override(backend: Backend) -> str:
    """`` latency.types=[...]`` naming the backend's non-default types, for a command the user should run."""
    odd = _nondefault_types(backend)
    return f" latency.types=[{','.join(odd)}]" if odd else ""


def _loud(msg: str) -> None:
    banner = "!" * 100
    warnings.warn(msg, TableMismatchWarning, stacklevel=3)
    print(f"{banner}\nWARNING: {msg}\n{banner}", file=sys.stderr)


ROOFLINE_ENV = "ARCHQUANT_ROOFLINE"


def roofline_params(device: str = "cpu", root: Path | None = None):
    """Roofline parameters: the file ``$ARCHQUANT_ROOFLINE`` names, else this device's committed, else cached,
    else measured now (and cached).

    The environment variable pins the estimate to fixed parameters (the test suite sets it, so that a budget
    derived from the roofline is the same on every machine).

    Raises:
        FileNotFoundError: ``$ARCHQUANT_ROOFLINE`` names a missing or unreadable roofline file.
    """
    pinned = os.environ.get(ROOFLINE_ENV)
    if pinned:
        params = load_roofline(pinned)
        if params is None:
            raise MissingFileError(
                f"${ROOFLINE_ENV}={pinned} is not a roofline file of this version (write one with "
                "archquant-profile, or unset the variable to measure this machine)"
            )
        return params
    name = device_name(device)
    committed = (tables_root() if root is None else Path(root)) / name / "roofline.json"
    for path in (committed, cache_dir() / "roofline" / f"{name}.json"):
        params = load_roofline(path)
        if params is not None:
            return params
    params = measure_roofline(device)
    save_roofline(cache_dir() / "roofline" / f"{name}.json", params, device)
    return params


def load_table_for(latency_cfg: LatencyConfig, space: Space, backend: Backend | str | None = None) -> LatencyModel:
    """The ``LatencyModel`` the search should use for this config.

    ``latency.table`` (a path) wins; else the committed table of this device/backend/model/scenario;
    else a roofline estimate, announced as such. A table from another device, software version or
    workload is used with a loud warning, or refused when ``latency.strict`` is true.

    Raises:
        TableError: mismatching table under ``latency.strict=true``, or a table for another backend/model.
        BackendError: the space has bit-widths the backend cannot run.
    """
    backend = get_backend(latency_cfg.backend, latency_cfg.backend_options()) if backend is None else backend
    backend = get_backend(backend) if isinstance(backend, str) else backend
    scenario = Scenario.from_config(latency_cfg)
    device = latency_cfg.device
    if latency_cfg.table:
        table = LatencyTable.load(latency_cfg.table)
    else:
        found = {p: LatencyTable.load(p) for p in find_tables(space, backend.name, scenario.name, device)}
        # a llama.cpp table prices the GGUF types it timed: one of other types cannot stand in
        paths = [p for p, t in found.items() if types_problem(t, backend, space) is None]
        exact = [p for p in paths if Scenario.from_header(found[p].header).same_workload(scenario)]
        if not (exact or paths):
            elsewhere = sorted(str(p.relative_to(tables_root())) for p in tables_root().glob(f"*/*-{backend.name}-*.json"))
            _loud(
                f"no profiled latency table for device {device_name(device)!r}, backend {backend.name!r}, scenario "
                f"{scenario.slug()!r} and this model under {tables_root()}: using a ROOFLINE ESTIMATE (not measured). "
                f"Run `archquant-profile latency.backend={backend.name} latency.scenario={scenario.name}"
                f"{_types_override(backend)}` to measure one"
                + (f"; tables exist for other devices: {elsewhere} (latency.table=<path> uses one)." if elsewhere else ".")
            )
            params = roofline_params(device)
            return LatencyModel(space, roofline_table(space, backend, scenario, params, device), backend)
        table = found[(exact or paths)[0]]
    problems = table_problems(table, backend, scenario, device)
    mismatch = types_problem(table, backend, space)
    if mismatch:  # latency.table=<path> named a table of other GGUF types: its prices are not these types'
        raise TableError(f"latency table {latency_cfg.table} was profiled for other GGUF types ({mismatch}); profile "
                         f"these: archquant-profile latency.backend={backend.name}{_types_override(backend)}")
    if problems:
        where = table.header.get("path", latency_cfg.table)
        msg = f"latency table {where} may not describe this run: " + "; ".join(problems) + "."
        if latency_cfg.strict:
            raise TableError(msg + " Refusing it because latency.strict=true: re-profile with archquant-profile.")
        _loud(msg + " Its latencies may be wrong here; re-profile with archquant-profile (latency.strict=true refuses).")
    return LatencyModel(space, table, backend)
