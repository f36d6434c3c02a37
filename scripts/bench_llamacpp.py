"""The original Q4_1 GGUF and compressed subnets, served by llama.cpp on this CPU: speed, size, quality.

For each point: decode ms/token (context C) and prefill ms (S tokens) timed in llama.cpp with the
interval of their median over rounds, GGUF file size, perplexity on the whole WikiText-2 raw test set
(``--ppl-windows 0``, the default) and a zero-shot subset scored on llama.cpp's own logits, and the
latency the committed llama.cpp tables predict. Points: the original file, llama.cpp's own presets of the
original (``--presets``; default the Pareto front's), and archquant's (a front, architectures, exports).

Timing runs after every point is evaluated, in ``--rounds`` interleaved rounds (each round runs one
llama.cpp session per file and scenario, in a rotated order) so that the machine's drift hits all
points alike: a point's figure is the median over rounds of each session's minimum (the latency
tables' statistic), and ratios between points are measured in the same minutes.

    python scripts/bench_llamacpp.py --pareto runs/x/pareto.json       # the search's front
    python scripts/bench_llamacpp.py --archs a/arch.json b/arch.json   # given architectures
    python scripts/bench_llamacpp.py --exports exp1 exp2               # export folders holding model.gguf
    python scripts/bench_llamacpp.py --random 4                        # random subnets (a sanity sweep)
    python scripts/bench_llamacpp.py --random 2 --quick                # smoke: 2 ppl windows, 20 PIQA rows

Writes ``results/bench_llamacpp.json`` and ``results/bench_llamacpp.png`` (``.quick`` with ``--quick``; another
name with ``--output``).
Architectures (``arch.json``) are materialised from the importance-ordered supernet (calibration data
``data.calib_file``), exported with ``export_gguf`` and evaluated as files; export folders are used as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from archquant.evaluation.gguf_scores import SCORES_ENV
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def _load_points(args) -> list[dict]:
    """Every requested point as ``{"name", "arch"?: Arch, "gguf"?: Path}``."""
    from archquant.core.arch import Arch

    points: list[dict] = []
    if args.pareto:
        data = json.loads(Path(args.pareto).read_text())
        items = data.get("points", data) if isinstance(data, dict) else data
        base = Path(args.pareto).parent
        names = [str(p.get("name") or p.get("label") or f"pareto-{i}") for i, p in enumerate(items)]
        wanted = set(args.points or [])
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"bench_llamacpp: --points {sorted(unknown)} are not in {args.pareto} (it has {names})")
        for name, p in zip(names, items):
            if wanted and name not in wanted:
                continue
            export = p.get("export_dir") or p.get("export")
            arch = p.get("arch_path") or p.get("arch")
            if export:
                points.append({"name": name, "gguf": _gguf_in(base / export if not Path(export).is_absolute() else Path(export)),
                               "record": {k: v for k, v in p.items() if isinstance(v, (int, float, str))}})
            elif isinstance(arch, dict):
                points.append({"name": name, "arch": Arch.from_dict(arch), "record": {}})
            elif arch:
                path = Path(arch) if Path(arch).is_absolute() else base / arch
                points.append({"name": name, "arch": Arch.load(path), "record": {}})
            elif p.get("source") == "preset":  # llama.cpp's own file, made by archquant-pareto
                points.append({"name": name, "gguf": Path((p.get("extra") or {})["gguf"]), "record": {},
                               "kind": "preset"})
            elif p.get("source") == "full":
                points.append({"name": name, "arch": "full", "record": {}})  # the original shape, resolved below
            else:
                raise SystemExit(f"bench_llamacpp: pareto point {name!r} has neither 'export_dir' nor 'arch' ('arch_path')")
    for path in args.archs or []:
        points.append({"name": Path(path).parent.name or Path(path).stem, "arch": Arch.load(path), "record": {}})
    for folder in args.exports or []:
        name = Path(folder).stem if Path(folder).suffix == ".gguf" else Path(folder).name
        points.append({"name": name, "gguf": _gguf_in(Path(folder)), "record": {}})
    return points


def _gguf_in(folder: Path) -> Path:
    if folder.suffix == ".gguf" and folder.is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"bench_llamacpp: {folder} holds no .gguf; export it with archquant-export export.formats=[packed,gguf]")
    return ggufs[0]


def _for_llamacpp(arch, space):
    """The arch as the llama.cpp space records it (activation bits are llama.cpp's decision)."""
    arch = dataclasses.replace(arch, layers=[dataclasses.replace(la, abits=16) for la in arch.layers],
                               group_size=space.group_size)
    arch.check(space)
    return arch


def evaluate_gguf(path: Path, tok, args, tables: dict, arch=None) -> dict:
    """Size, perplexity and zero-shot accuracy of one GGUF in llama.cpp, and the tables' predictions.

    Scores are cached per WikiText-2 window and per task under the file's sha256 (``evaluation.gguf_scores``,
    shared with ``exp_joint_vs_sequential.py``; the whole test takes ~15 min per model here): a killed run resumes
    where it was, and ``--eval-only`` runs can fill the cache ahead of a timing run. Per-window NLLs are returned
    with them (``window_nll``, for paired bootstraps between points)."""
    from archquant.evaluation import gguf_scores

    out = {"file": str(path), "file_mb": round(path.stat().st_size / 1e6, 2)}
    for name in tables["scenarios"]:
        lm = tables["models"].get(name)
        if lm is not None and arch is not None:
            out[f"{name}_predicted_ms"] = round(lm.predict_ms(arch), 3)
    t0 = time.perf_counter()
    windows = None if args.ppl_windows is None else list(range(args.ppl_windows))
    ppl = gguf_scores.perplexity(path, tok, windows, seq_len=args.ppl_seq_len, threads=args.eval_threads,
                                 score_missing=not args.scored_only)
    if ppl["ppl"] is None:  # --scored-only: a file whose record lacks windows keeps no perplexity, not a partial one
        scores: dict = {"wikitext2_ppl": None, "ppl_windows_unscored": ppl["unscored"]}
    else:
        scores = {"wikitext2_ppl": round(ppl["ppl"], 4), "ppl_tokens": ppl["tokens"], "window_nll": ppl["window_nll"]}
    if args.tasks:
        zs = gguf_scores.zero_shot(path, tok, [(t, args.limit) for t in args.tasks], seq_len=args.ppl_seq_len,
                                   threads=args.eval_threads)
        scores["zero_shot"] = {t: {k: r[k] for k in ("acc", "acc_norm", "n", "stderr") if r.get(k) is not None}
                               for t, r in zs.items()}
    scores["eval_s"] = round(time.perf_counter() - t0, 1)
    return {**out, **scores}


def _paired_with_original(rows: list[dict], tokens_per_window: int) -> None:
    """Each row's perplexity minus the original file's, with a paired-bootstrap 95% interval over the same windows
    (``ppl_vs_original``); the per-window NLLs then leave the row (they stay in the score cache)."""
    from archquant.evaluation.bootstrap import paired_ppl_difference

    ref = next((r for r in rows if r.get("kind") == "original" and r.get("window_nll")), None)
    ref_nll = None if ref is None else ref["window_nll"]
    for r in rows:
        nll = r.pop("window_nll", None)
        if ref_nll is not None and r is not ref and nll is not None:
            d = paired_ppl_difference(nll, ref_nll, tokens_per_window)
            r["ppl_vs_original"] = {"diff": round(d["diff"], 4), "ci95": [round(x, 4) for x in d["ci"]]}


def time_interleaved(rows: list[dict], scenarios: dict, rounds: int, threads: int) -> None:
    """Time every row's ``file`` per scenario with ``measure_interleaved``; adds ``{scenario}_ms`` (median over
    rounds of the session minimum), ``{scenario}_median_ms`` (all samples) and ``{scenario}_rounds_ms``."""
    from archquant.latency.llamacpp_profiler import time_gguf
    from archquant.latency.measure import LatencyMeasurement, measure_interleaved

    def timer(path, scen):
        def run():
            res = time_gguf(path, scen, threads=threads)
            return LatencyMeasurement(ms=res["ms"], method="session minimum", samples=res["samples"])

        return run

    timers = {(i, name): timer(row["file"], scen) for i, row in enumerate(rows) for name, scen in scenarios.items()}
    out = measure_interleaved(timers, rounds, progress=True)
    for (i, name), m in out.items():
        rows[i][f"{name}_ms"] = round(m.ms, 3)
        rows[i][f"{name}_median_ms"] = round(m.details["median_ms"], 3)
        rows[i][f"{name}_rounds_ms"] = [round(x, 3) for x in m.samples]
        if m.ci_ms is not None:  # the spread: an order-statistic interval of the median over rounds
            rows[i][f"{name}_ci_ms"] = [round(x, 3) for x in m.ci_ms]
            rows[i][f"{name}_ci_level"] = m.ci_level


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    style = {"original": ("*", "tab:red", "original file"), "preset": ("s", "tab:orange", "llama-quantize preset"),
             "archquant": ("o", "tab:blue", "archquant point")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, axis_label in ((axes[0], "decode_ms", "decode ms/token"), (axes[1], "prefill_ms", "prefill ms")):
        shown = sorted((r for r in rows if key in r and r.get("wikitext2_ppl") is not None),
                       key=lambda r: r["wikitext2_ppl"])
        seen = set()
        for i, r in enumerate(shown):
            marker, color, kind_label = style.get(r.get("kind", "archquant"), style["archquant"])
            ci = r.get(key.replace("_ms", "_ci_ms"))
            if ci:
                ax.errorbar(r[key], r["wikitext2_ppl"], xerr=[[r[key] - ci[0]], [ci[1] - r[key]]], fmt="none",
                            ecolor="0.5", elinewidth=1, capsize=2)
            ax.scatter(r[key], r["wikitext2_ppl"], s=20 + r["file_mb"], marker=marker, color=color, alpha=0.8,
                       label=None if kind_label in seen else kind_label)
            seen.add(kind_label)
            # neighbours in perplexity alternate above / below their marker, so near-ties stay readable
            ax.annotate(r["name"], (r[key], r["wikitext2_ppl"]), fontsize=7, xytext=(4, 3 if i % 2 else -9),
                        textcoords="offset points")
        ax.set_xlabel(f"llama.cpp {axis_label} (median of session minima)")
        ax.set_ylabel("WikiText-2 perplexity")
        ppls = [r["wikitext2_ppl"] for r in shown]
        if ppls and max(ppls) > 3 * min(ppls):  # a collapsed point would squash the others on a linear axis
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("llama.cpp on this CPU (marker area ~ GGUF MB)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pareto", help="pareto.json: points with 'export_dir' or 'arch' / 'arch_path'")
    ap.add_argument("--points", nargs="+", help="only these points of --pareto (by name)")
    ap.add_argument("--archs", nargs="*", help="arch.json files")
    ap.add_argument("--exports", nargs="*", help="export folders (or .gguf files)")
    ap.add_argument("--keep-exports", metavar="DIR",
                    help="write the GGUFs of architectures to DIR/<name>.gguf (kept; later runs pass them as --exports)")
    ap.add_argument("--random", type=int, default=0, help="add N random subnets of the llama.cpp space")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-original", action="store_true", help="skip the original Q4_1 GGUF")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-threads", type=int, default=None, help="llama.cpp threads for scoring (default --threads)")
    ap.add_argument("--eval-only", action="store_true",
                    help="score (and cache) every point, time nothing; write results/<--output>.json only if named")
    ap.add_argument("--scored-only", action="store_true",
                    help="score no new windows: a file whose score record lacks some gets no perplexity (time it anyway)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--ppl-seq-len", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=0, help="WikiText-2 windows (0 = the whole test set)")
    ap.add_argument("--presets", nargs="*", default=None,
                    help="llama-quantize presets of the original to add (default: pareto.presets' llama.cpp default)")
    ap.add_argument("--tasks", nargs="*", default=["piqa", "arc_easy"])
    ap.add_argument("--limit", type=int, default=200, help="rows per zero-shot task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (one session per file each)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 ppl windows, 20 rows of PIQA only")
    ap.add_argument("--output", help="results/<OUTPUT>.json and .png (default bench_llamacpp, .quick with --quick)")
    ap.add_argument("--scores", help="folder of the per-file score records (default $ARCHQUANT_SCORES, else the "
                    "cache; results/gguf_scores keeps them with the results)")
    args = ap.parse_args(argv)
    if args.scores:
        os.environ[SCORES_ENV] = str(Path(args.scores).resolve())
    if args.points and not args.pareto:
        ap.error("--points picks points of a front: pass the front with --pareto <run>/pareto.json")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.quick:
        args.ppl_windows, args.limit, args.tasks, args.rounds = 2, 20, ["piqa"], 2
    args.ppl_windows = args.ppl_windows or None
    if args.keep_exports:
        Path(args.keep_exports).mkdir(parents=True, exist_ok=True)
    args.eval_threads = args.eval_threads or args.threads
    torch.set_num_threads(args.threads)

    from archquant.backends.llamacpp import LlamaCppBackend
    from archquant.core.space import SpaceConfig, resolve_space
    from archquant.data.calibration import calibration_blocks
    from archquant.engine.gguf_writer import export_gguf
    from archquant.engine.llamacpp import require_llama_cpp
    from archquant.engine.presets import DEFAULT_PRESETS, ORIGINAL, preset_files
    from archquant.latency.config import LatencyConfig
    from archquant.latency.llamacpp_profiler import sample_archs
    from archquant.latency.loader import find_tables
    from archquant.latency.model import LatencyModel
    from archquant.latency.scenario import Scenario
    from archquant.latency.table import LatencyTable
    from archquant.models.embedded import EMBEDDED_NAME, ensure_embedded_gguf
    from archquant.models.registry import load_model
    from archquant.supernet import Arch, build, materialize
    from archquant.utils.paths import cache_dir

    require_llama_cpp()
    points = _load_points(args)
    model, tok = load_model(args.model)
    backend = LlamaCppBackend()
    space_cfg = backend.restrict_space(SpaceConfig(), model.config)
    space = resolve_space(space_cfg, model.config)
    points += [{"name": f"random-{i}", "arch": a, "record": {}}
               for i, a in enumerate(sample_archs(space, args.random, random.Random(args.seed)))]
    scen = {"decode": Scenario("decode", context=args.context), "prefill": Scenario("prefill", prefill_len=args.prefill_len)}
    models = {}
    for name in scen:
        paths = find_tables(space, "llamacpp", name)
        if paths:
            models[name] = LatencyModel(space, LatencyTable.load(paths[0]), backend)
    tables = {"scenarios": scen, "models": models}
    header = run_header(threads=args.threads, rounds=args.rounds,
                        statistic="median over interleaved rounds of each session's minimum (median of all samples also recorded)",
                        tables={k: m.table.header.get("path") for k, m in models.items()},
                        latency=dataclasses.asdict(LatencyConfig(backend="llamacpp", context=args.context,
                                                                 prefill_len=args.prefill_len)))
    rows = []
    if not args.no_original and args.model == EMBEDDED_NAME:
        orig = ensure_embedded_gguf()
        print(f"original: {orig}")
        rows.append({"name": "original-Q4_1", "kind": "original", **evaluate_gguf(orig, tok, args, tables)})
    presets = [n for n in (DEFAULT_PRESETS if args.presets is None else args.presets) if n != ORIGINAL]
    if presets:
        files = preset_files(model, cache_dir() / "presets" / args.model, presets,
                             source_gguf=ensure_embedded_gguf() if args.model == EMBEDDED_NAME else None,
                             tokenizer=tok, threads=args.threads)
        for name, path in files.items():
            print(f"preset {name}: {path}")
            rows.append({"name": f"preset-{name}", "kind": "preset", **evaluate_gguf(path, tok, args, tables)})
    needs_sn = any("arch" in p for p in points)
    sn = None
    if needs_sn:
        calib = calibration_blocks(tok)
        sn = build(model, space_cfg, backend=backend, calib_ids=calib)
    src = {"source_gguf": ensure_embedded_gguf()} if args.model == EMBEDDED_NAME else {"tokenizer": tok}
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        for i, p in enumerate(points):
            arch = None
            if "arch" in p:
                arch = _for_llamacpp(Arch.full(space) if p["arch"] == "full" else p["arch"], space)
            out = Path(args.keep_exports) / f"{p['name']}.gguf" if args.keep_exports else Path(tmp) / f"{i:03d}.gguf"
            path = p.get("gguf") or export_gguf(materialize(sn, arch), out, **src)
            print(f"{p['name']}: {arch.summary() if arch else path}")
            row = {"name": p["name"], "kind": p.get("kind", "archquant"), **p.get("record", {}),
                   **evaluate_gguf(Path(path), tok, args, tables, arch)}
            if arch is not None:
                row["arch"] = arch.summary()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("zero_shot", "window_nll")}))
        _paired_with_original(rows, args.ppl_seq_len - 1)
        if args.eval_only:
            untimed = {k: v for k, v in header.items() if k not in ("rounds", "statistic", "latency")}
            result = {"header": {**untimed, "timing": None}, "points": rows}
            if args.output:  # the scores alone (no timing, no plot): e.g. whole-test perplexities of the presets
                atomic_write_json(ROOT / "results" / f"{args.output}.json", result)
                print(f"--eval-only: nothing timed; wrote results/{args.output}.json")
            else:
                print("--eval-only: scores cached, nothing timed")
            return result
        time_interleaved(rows, scen, args.rounds, args.threads)
        for row in rows:
            print(f"{row['name']:<24} " + "  ".join(f"{n} {row[n + '_ms']:.2f} ms" for n in scen))
    stem = args.output or ("bench_llamacpp.quick" if args.quick else "bench_llamacpp")
    result = {"header": header, "points": rows}
    atomic_write_json(ROOT / "results" / f"{stem}.json", result)
    _plot(rows, ROOT / "results" / f"{stem}.png")
    print(f"wrote results/{stem}.json and .png")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
