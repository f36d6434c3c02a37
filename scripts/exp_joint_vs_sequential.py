"""Joint search vs sequential baselines vs llama.cpp presets at equal measured latency, in llama.cpp on this CPU.

1. **Searches**: ``archquant-run preset=quick`` at ``--fractions`` of the full model's predicted latency, with both
   sequential baselines (``prune_quantise``, ``sequential_search``) and llama.cpp's presets on its front, without
   distillation (every point compared as searched), into ``<out>/run`` (a killed run resumes).
2. **Files**: every distinct point of that front as a GGUF under ``<out>/gguf``: ours exported from a session of
   the run's own config (the importance-weighted blocks the run timed), presets as llama.cpp wrote them.
3. **Timing**: the files in ``--rounds`` interleaved rounds (llama.cpp decode at context 256, batch 1; each
   round times every file once in a rotated order), median of session minima with its interval.
4. **Quality** in llama.cpp: perplexity on the WikiText-2 raw test in windows of 512 tokens, every window by
   default (``--ppl-stride k`` scores every k-th), each window's NLL cached per file so a killed or partial run
   resumes and a later run with a smaller stride only scores what is missing; the zero-shot suite (``--tasks``,
   ``--limit`` rows per task, every PIQA row unless ``--piqa-limit``), cached per file and task.
5. **Targets**: ``--targets`` latencies evenly between the fastest preset and the original file (as timed here);
   per target the joint pick, each baseline family's best point and the best preset meeting it, the
   joint-minus-other perplexity difference with a paired-bootstrap 95% interval over the same windows, and the
   joint pick's speed-up at equal perplexity over the baselines (``archquant/search/compare.py``).

    python scripts/exp_joint_vs_sequential.py                                  # everything (hours here)
    python scripts/exp_joint_vs_sequential.py --ppl-stride 8 --limit 100 --piqa-limit 500    # a cheaper reading
    python scripts/exp_joint_vs_sequential.py --run <out>/run                  # a finished run's front
    python scripts/exp_joint_vs_sequential.py --run results/exp_joint_vs_sequential.run.json --scores results/gguf_scores
                                                           # the same files on another machine, without searching

Writes ``results/exp_joint_vs_sequential.json`` and ``.png``, and the run's record
``results/exp_joint_vs_sequential.run.json`` (its overrides and front, every architecture included): given to
``--run``, it rebuilds the very files (exports are deterministic; presets are re-made by llama-quantize) so that
the hours of scoring can continue on another machine with the score records kept under ``--scores``.
``--select-stride k`` (default 16) scores every file on every k-th window first and then only the points the
comparison needs (the joint picks, each family's best point meeting a target, the speed-up references, the
original) on every ``--ppl-stride``-th: the whole test for ~6 files instead of ~19.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from archquant.evaluation.gguf_scores import SCORES_ENV
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu"]
PRESETS = ["original", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M"]


def run_searches(out: Path, fractions: list[float], overrides: list[str]) -> list[str]:
    """The main job's searches, baselines and presets (no distillation, export or final evaluation); returns
    the overrides it ran with (to rebuild its session)."""
    run = out / "run"
    ov = ["preset=quick", f"run.budget_fractions=[{','.join(f'{f:g}' for f in fractions)}]",
          f"pareto.presets=[{','.join(PRESETS)}]", "pareto.baselines=[prune_quantise,sequential_search]",
          "run.distill=false", "run.export=false", "run.evaluate=false",
          "pareto.timing_rounds=3", "pareto.timing_max_rounds=3", *overrides]  # the files are re-timed here
    if not (run / "pareto.json").exists():
        resume = [f"resume={run}"] if (run / "searches").is_dir() else []
        cmd = [sys.executable, "-m", "archquant", "run", *ov, *resume, f"hydra.run.dir={run}"]
        print(" ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc not in (0, 3):  # 3: no point met the run's own SLO, which this experiment does not use
            raise SystemExit(f"archquant-run failed (exit {rc}); rerun this script to resume it")
    return ov


def run_overrides(run: Path) -> list[str]:
    """The overrides a finished run was launched with (Hydra's record), minus Hydra's own."""
    import yaml

    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise SystemExit(f"{run} has no .hydra/overrides.yaml: pass a folder written by archquant-run")
    return [o for o in yaml.safe_load(path.read_text()) if not o.startswith(("hydra.", "resume="))]


def session_of(overrides: list[str], out_dir: Path):
    from hydra import compose, initialize_config_dir

    from archquant.cli import CONFIG_DIR
    from archquant.commands.session import Session
    from archquant.config import register_configs, to_object

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
        cfg.out_dir = str(out_dir)
        cfg = to_object(cfg)
    return cfg, Session.load(cfg)


def gguf_path(folder: Path, name: str) -> Path:
    """Where ``point_files`` keeps the GGUF of the point ``name`` (``@`` is not welcome in file names)."""
    return folder / f"{name.replace('@', '_at_')}.gguf"


def point_files(points: list[dict], session, folder: Path) -> dict[str, Path]:
    """``name -> GGUF`` for every distinct point (twins share their source's file; the F16 ``full`` point, which
    has no arch, is left out)."""
    from archquant.core.arch import Arch
    from archquant.engine.gguf_writer import export_gguf

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = _preset_files([p for p in points if p["source"] == "preset"], session)
    for p in points:
        extra = p.get("extra") or {}
        if p["source"] == "preset":
            continue
        if extra.get("same_arch_as") or p.get("arch") is None:
            continue
        path = gguf_path(folder, p["name"])
        if not path.is_file():
            model = session.materialize(Arch.from_dict(p["arch"]))
            tmp = path.with_suffix(".tmp.gguf")  # the model's own types; the original's tokenizer where there is one
            export_gguf(model, tmp, source_gguf=session.gguf_source(), tokenizer=session.tokenizer)
            tmp.replace(path)
        files[p["name"]] = path
    return files


def _preset_files(points: list[dict], session) -> dict[str, Path]:
    """``name -> GGUF`` of the preset points; files missing here (a record from another machine) are re-made by
    llama-quantize into this machine's preset cache, all in one call."""
    from archquant.engine.presets import ORIGINAL, preset_files
    from archquant.latency.loader import model_slug
    from archquant.utils.paths import cache_dir

    out, missing = {}, {}
    for p in points:
        path = Path(p["extra"]["gguf"])
        if path.is_file():
            out[p["name"]] = path
        elif p["extra"]["preset"] == ORIGINAL:
            if session.gguf_source() is None:
                raise SystemExit(f"{path} (the original file) is missing and {session.cfg.model.name} was not loaded "
                                 "from a GGUF: run the experiment where the original is")
            out[p["name"]] = Path(session.gguf_source())
        else:
            missing[p["extra"]["preset"]] = p["name"]
    if missing:
        made = preset_files(session.model, cache_dir() / "presets" / model_slug(session.cfg.model.name), list(missing),
                            source_gguf=session.gguf_source(), tokenizer=session.tokenizer)
        out.update({name: made[preset] for preset, name in missing.items()})
    return out


def load_run(run_arg: str | None, out: Path, fractions: list[float], extra: list[str], record: Path):
    """``(run folder, overrides, front points)``: from a run record (``--run <record>.json``), a finished run folder
    (``--run <folder>``) or the searches run here; the record is written whenever it came from a folder."""
    if run_arg and Path(run_arg).is_file():
        rec = json.loads(Path(run_arg).read_text())
        if not {"overrides", "points"} <= rec.keys():
            raise SystemExit(f"{run_arg} is not a run record (it needs 'overrides' and 'points'): pass the "
                             f"results/<output>.run.json this script wrote, or a run folder")
        run = out / "run"
        run.mkdir(parents=True, exist_ok=True)
        return run, rec["overrides"], rec["points"]
    if run_arg:
        run = Path(run_arg)
        overrides = run_overrides(run)
    else:
        run = out / "run"
        overrides = run_searches(out, fractions, extra)
    if not (run / "pareto.json").is_file():
        raise SystemExit(f"{run} has no pareto.json: pass a finished archquant-run folder to --run, or leave --run out")
    points = [{**p, "reference": _reference(p)} for p in json.loads((run / "pareto.json").read_text())["points"]]
    record.parent.mkdir(exist_ok=True)
    atomic_write_json(record, {"overrides": overrides, "points": points})
    return run, overrides, points


def needed_names(comparisons: list[dict], original: str) -> set[str]:
    """The points a comparison rests on: the joint picks, every family's point at each target and the speed-up
    references (the rest of the front only competes for those places)."""
    names = {original}
    for c in comparisons:
        if c["joint"]:
            names.add(c["joint"]["name"])
        names |= {e["point"]["name"] for e in c["versus"].values() if e["point"]}
        for key in ("speedup_vs_baselines", "speedup_vs_presets"):
            ref = (c.get(key) or {}).get("versus")
            if ref:
                names.add(ref["name"])
    return names


def refine_scores(coarse: dict[str, dict], choose, score) -> dict[str, dict]:
    """Finer scores for the points a choice rests on: ``choose(scores) -> names`` is made on the finer scores where
    a point has them and the coarse ones elsewhere, and ``score(names)`` adds finer ones, until the choice needs
    no point without them (a rival the coarse scores ranked out but the finer ones rank in is scored too)."""
    fine: dict[str, dict] = {}
    while True:
        need = choose({n: fine.get(n, c) for n, c in coarse.items()})
        if need <= fine.keys():
            return fine
        fine.update(score(sorted(need - fine.keys())))


def with_recorded(fine: dict[str, dict], names, read) -> dict[str, dict]:
    """``fine`` plus the finer scores of the other ``names`` that ``read(name)`` finds already recorded (its
    ``ppl`` is None where the record lacks some window: that point keeps its coarse reading)."""
    out = dict(fine)
    for name in sorted(set(names) - fine.keys()):
        got = read(name)
        if got["ppl"] is not None:
            out[name] = got
    return out


def score_ppl(path: Path, tok, args, stride: int | None = None, score_missing: bool = True) -> dict:
    """Per-window NLLs of one GGUF in llama.cpp on every ``stride``-th (``--ppl-stride``) WikiText-2 window (cached per window,
    shared with ``bench_llamacpp.py``: ``archquant.evaluation.gguf_scores``)."""
    from archquant.data.config import DataConfig
    from archquant.data.files import resolve_data_path
    from archquant.evaluation import gguf_scores
    from archquant.evaluation.perplexity import window_count

    n = window_count(tok, resolve_data_path(DataConfig(), "ppl_file"), args.seq_len)
    return gguf_scores.perplexity(path, tok, list(range(0, n, stride or args.ppl_stride)), seq_len=args.seq_len,
                                  threads=args.threads, chunk=args.chunk, log=lambda m: print(m, flush=True),
                                  score_missing=score_missing)


def score_zero_shot(path: Path, tok, args) -> dict:
    """The zero-shot suite of one GGUF on llama.cpp's logits (``--limit`` rows per task, ``--piqa-limit`` for PIQA),
    cached per task."""
    from archquant.evaluation import gguf_scores

    jobs = [(t, args.piqa_limit if t == "piqa" else args.limit) for t in args.tasks]
    return gguf_scores.zero_shot(path, tok, jobs, seq_len=args.seq_len, threads=args.threads,
                                 log=lambda m: print(m, flush=True))


def _reference(point: dict) -> str | None:
    """The reference a search's result was replaced by (the reference check, ``search.json``), if any; a run
    record carries it (``reference``), since its run folders stay on the machine that searched."""
    if "reference" in point:
        return point["reference"]
    path = Path(point.get("run_dir") or "/nonexistent") / "search.json"
    if not path.is_file():
        return None
    ref = json.loads(path.read_text())["result"].get("reference") or {}
    return ref.get("name")


def time_files(files: dict[str, Path], rounds: int, threads: int) -> dict[str, dict]:
    from archquant.latency.config import LatencyConfig
    from archquant.latency.measure import file_timer, measure_interleaved

    lat = LatencyConfig(backend="llamacpp", scenario="decode", context=256)
    timers = {name: file_timer(path, lat, threads=threads) for name, path in files.items()}
    out = measure_interleaved(timers, rounds, progress=True, max_rounds=rounds)
    return {name: {"ms": m.ms, "ci_ms": m.ci_ms, "ci_level": m.ci_level, "rounds_ms": m.samples} for name, m in out.items()}


def _previous_timing(path: Path, files: dict[str, Path]) -> dict[str, dict] | None:
    """The timings a previous run of this experiment wrote, if it timed exactly these files (``--reuse-timing``:
    more windows or tasks scored later keep the interleaved rounds every point was timed in together)."""
    if not path.is_file():
        return None
    old = {r["name"]: r for r in json.loads(path.read_text())["points"] if not r.get("same_as")}
    if set(old) != set(files) or any(old[n]["file"] != str(p) for n, p in files.items()):
        print(f"--reuse-timing: {path} timed other files; timing again", flush=True)
        return None
    return {n: {k: old[n][k] for k in ("ms", "ci_ms", "ci_level", "rounds_ms")} for n in files}


def plot(rows: list[dict], comparisons: list[dict], path: Path) -> tuple[float, float]:
    """The front and the targets as a PNG; returns the perplexity axis' limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"joint": ("o", "tab:blue", "joint search"), "prune_quantise": ("v", "tab:green", "prune, then quantise"),
             "sequential_search": ("^", "tab:purple", "16-bit search, then quantise"),
             "preset": ("s", "tab:orange", "llama-quantize preset"), "original": ("*", "tab:red", "original file"),
             "uniform": ("D", "0.4", "uniform (full width)"), "full": ("P", "0.2", "full (F16)")}
    fig, ax = plt.subplots(figsize=(8, 5))
    # the axis covers the points worth comparing; collapsed ones (over 1.4x the original's perplexity) sit on
    # its top edge, marked and labelled with their perplexity, instead of squashing the rest into a strip
    original = next((r["ppl"] for r in rows if r["family"] == "original"), None)
    top = 1.4 * original if original else max(r["ppl"] for r in rows)
    seen, n_off = set(), 0
    for r in rows:
        marker, color, label = style.get(r["family"], ("x", "k", r["family"]))
        off = r["ppl"] > top
        y = top if off else r["ppl"]
        ci = r.get("ci_ms")
        if ci:
            ax.errorbar(r["ms"], y, xerr=[[r["ms"] - ci[0]], [ci[1] - r["ms"]]], fmt="none", ecolor="0.6", lw=1)
        ax.scatter(r["ms"], y, marker="^" if off else marker, color=color, s=60 if r["family"] == "joint" else 35,
                   label=None if label in seen else label, zorder=3, clip_on=False)
        seen.add(label)
        if r.get("same_as"):
            continue  # drawn (and named) once, as the point it equals
        name = r["name"].replace("sequential_search", "seq").replace("prune_quantise", "pq").replace("preset-", "")
        # labels on the top edge alternate between two lines, so neighbours do not overprint
        ax.annotate(f"{name} (ppl {r['ppl']:.0f})" if off else name, (r["ms"], y), fontsize=6,
                    xytext=(3, -9 - 8 * (n_off % 2) if off else 3), textcoords="offset points")
        n_off += off
    for c in comparisons:
        ax.axvline(c["target_ms"], color="tab:blue", ls=":", lw=1)
    ax.set_ylim(0.97 * min(r["ppl"] for r in rows), top)
    ax.set_xlabel("llama.cpp decode ms/token (median of session minima, interleaved rounds)")
    ax.set_ylabel("WikiText-2 perplexity (llama.cpp)")
    ax.set_title("joint search vs sequential baselines and presets (dotted: targets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return ax.get_ylim()


def markdown(result: dict) -> str:
    """The README tables: every point, then each target's comparison."""
    zs_tasks = next((list(r["zero_shot"]) for r in result["points"] if r.get("zero_shot")), [])
    # where the compared points were scored on more windows than the rest, say which ppl rests on how many
    windows = len({r.get("ppl_windows") for r in result["points"]}) > 1
    mean = " zero-shot mean |" if zs_tasks else ""
    lines = ["| point | family | decode ms [interval] | ppl |" + (" windows |" if windows else "") + " MB |"
             + "".join(f" {t} |" for t in zs_tasks) + mean,
             "|---|---|---|---|---|" + "---|" * (len(zs_tasks) + windows + bool(mean))]
    twins: dict[str, list[str]] = {}
    for r in result["points"]:
        if r.get("same_as"):
            twins.setdefault(r["same_as"], []).append(r["name"])
    for r in sorted(result["points"], key=lambda r: r["ms"]):
        if r.get("same_as"):
            continue
        ci = r.get("ci_ms") or [r["ms"], r["ms"]]
        zs = r.get("zero_shot") or {}
        cells = [f"{zs[t][zs[t]['metric']]:.3f} +- {zs[t]['stderr']:.3f}" if t in zs else "" for t in zs_tasks]
        if mean:  # the headline metrics' plain mean, where every task was scored
            cells.append(f"{sum(zs[t][zs[t]['metric']] for t in zs_tasks) / len(zs_tasks):.3f}"
                         if all(t in zs for t in zs_tasks) else "")
        name = r["name"] + (f" ({r['reference']})" if r.get("reference") else "")
        name += f" (= {', '.join(twins[r['name']])})" if r["name"] in twins else ""
        lines.append(f"| {name} | {r['family']} | {r['ms']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | {r['ppl']:.2f} | "
                     + (f"{r.get('ppl_windows')} | " if windows else "")
                     + f"{r['file_mb']:.1f} |" + "".join(f" {c} |" for c in cells))
    lines += ["", "| target ms | joint pick: ms, ppl | vs prune_quantise | vs sequential_search | vs best preset | "
                  "speed-up at equal ppl (vs baselines) |", "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        j = c["joint"]
        cells = []
        for fam in ("prune_quantise", "sequential_search", "preset"):
            e = c["versus"][fam]
            if e["unmet"]:
                cells.append("unmet")
                continue
            d = e.get("joint_minus")
            diff = "" if not d else f": {d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
            cells.append(f"{e['point']['name']} {e['point']['ppl']:.2f}{diff}" + (" (same point)" if e.get("same_point") else ""))
        sp = (c.get("speedup_vs_baselines") or {})
        speed = "none as accurate" if j and sp.get("speedup") is None else (f"{sp['speedup']:.2f}x vs {sp['versus']['name']}" if j else "")
        head = f"{j['name']} {j['ms']:.2f}, {j['ppl']:.2f}" if j else "unmet"
        lines.append(f"| {c['target_ms']:.2f} | {head} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "exp_joint_vs_sequential"))
    ap.add_argument("--run", help="a finished archquant-run folder, or the run record results/<output>.run.json, to "
                                  "read instead of running the searches")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.56, 0.62],
                    help="search budgets as fractions of the full model's predicted latency")
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-stride", type=int, default=1, help="score every k-th WikiText-2 window (1: the whole test)")
    ap.add_argument("--select-stride", type=int, default=16,
                    help="score every file on every k-th window to find the compared points, then only those on "
                         "every --ppl-stride-th (<= --ppl-stride: every file on the finer windows)")
    ap.add_argument("--chunk", type=int, default=8, help="windows scored between cache writes")
    ap.add_argument("--scores", help="folder of the per-file score records (default $ARCHQUANT_SCORES, else the "
                    "cache; results/gguf_scores keeps them with the results)")
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--limit", type=int, default=500, help="rows per zero-shot task (0: all)")
    ap.add_argument("--piqa-limit", type=int, default=0, help="PIQA rows (0: all)")
    ap.add_argument("--output", default="exp_joint_vs_sequential")
    ap.add_argument("--reuse-timing", action="store_true",
                    help="keep the timings of results/<output>.json when it timed the same files (score more, time once)")
    ap.add_argument("--markdown", action="store_true", help="print the README tables of results/<output>.json and stop")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the searches (after --)")
    args = ap.parse_args(argv)
    if args.scores:
        os.environ[SCORES_ENV] = str(Path(args.scores).resolve())
    if min(args.ppl_stride, args.select_stride, args.targets, args.rounds) < 1:
        ap.error("--ppl-stride, --select-stride, --targets and --rounds must be >= 1")
    args.limit, args.piqa_limit = args.limit or None, args.piqa_limit or None
    if args.markdown:
        path = ROOT / "results" / f"{args.output}.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: run this script without --markdown first")
        result = json.loads(path.read_text())
        print(markdown(result))
        return result
    torch.set_num_threads(args.threads)

    from archquant.search.compare import Scored, compare_at_targets, family_of, targets_between

    out = Path(args.out)
    run, overrides, points = load_run(args.run, out, args.fractions, list(args.overrides),
                                      ROOT / "results" / f"{args.output}.run.json")
    cfg, session = session_of(overrides, run)
    files = point_files(points, session, out / "gguf")
    print(f"{len(files)} distinct files of {len(points)} points", flush=True)

    timing = _previous_timing(ROOT / "results" / f"{args.output}.json", files) if args.reuse_timing else None
    if timing is None:
        timing = time_files(files, args.rounds, args.threads)  # first: scoring takes hours, timing minutes
    source = {p["name"]: (p.get("extra") or {}).get("same_arch_as") or p["name"] for p in points}
    source = {n: src for n, src in source.items() if src in files}

    def compare(scores: dict[str, dict], paired: bool = True):
        rows, scored = [], []
        for p in points:
            src = source.get(p["name"])
            if src is None or src not in scores:
                continue
            s, t = scores[src], timing[src]
            fam = family_of(p)
            rows.append({"name": p["name"], "family": fam, "same_as": None if src == p["name"] else src,
                         "reference": _reference(p),
                         "file": str(files[src]), "file_mb": round(files[src].stat().st_size / 1e6, 2),
                         "ms": t["ms"], "ci_ms": t["ci_ms"], "ci_level": t["ci_level"], "rounds_ms": t["rounds_ms"],
                         "ppl": s["ppl"], "ppl_windows": s["windows"], "run_ppl": p.get("ppl"),
                         "run_ms": p.get("measured_ms")})
            scored.append(Scored(p["name"], fam, t["ms"], s["ppl"], tuple(s["window_nll"]) if paired else None))
        return rows, scored

    def score_all(names, stride: int) -> dict[str, dict]:
        out_scores = {}
        for name in names:
            print(f"perplexity of {name} ({files[name].name}), every {stride}-th window", flush=True)
            out_scores[name] = score_ppl(files[name], session.tokenizer, args, stride)
        return out_scores

    # coarse windows are a subset of the fine ones (their scores are reused): a multiple of --ppl-stride
    select = max(1, -(-args.select_stride // args.ppl_stride)) * args.ppl_stride
    coarse = score_all(files, select)
    rows, scored = compare(coarse)
    presets = [r for r in rows if r["family"] == "preset"]
    original = next(r for r in rows if r["family"] == "original")
    lo = min(r["ms"] for r in presets) if presets else 0.5 * original["ms"]
    targets = targets_between(lo, original["ms"], args.targets)
    comparisons = compare_at_targets(scored, targets, args.seq_len - 1)
    if select != args.ppl_stride:
        # the points the comparison rests on, on the finer windows (refine_scores)
        def choose(scores: dict[str, dict]) -> set[str]:
            _, mixed = compare(scores, paired=False)
            return {source[n] for n in needed_names(compare_at_targets(mixed, targets, args.seq_len - 1),
                                                    original["name"])}

        fine = refine_scores(coarse, choose, lambda names: score_all(names, args.ppl_stride))
        # the rest of the front keeps its coarse reading unless its record already holds the finer windows
        # (scored by an earlier run or another script: free to read, and compared like the rest)
        fine = with_recorded(fine, files.keys(), lambda src: score_ppl(files[src], session.tokenizer, args,
                                                                       args.ppl_stride, score_missing=False))
        _, scored = compare(fine)
        comparisons = compare_at_targets(scored, targets, args.seq_len - 1)
        for r in rows:
            src = r["same_as"] or r["name"]
            if src in fine:
                r["ppl"], r["ppl_windows"] = fine[src]["ppl"], fine[src]["windows"]
    # the zero-shot suite for the points compared (the slow part: every task on llama.cpp's logits)
    compared = {original["name"]} | {e["point"]["name"] for c in comparisons for e in c["versus"].values() if e["point"]}
    compared |= {c["joint"]["name"] for c in comparisons if c["joint"]}
    zero_shot = {}  # by file: twins share their source's
    for src in sorted({r["same_as"] or r["name"] for r in rows if r["name"] in compared}):
        print(f"zero-shot of {src}", flush=True)
        zero_shot[src] = score_zero_shot(files[src], session.tokenizer, args)
    for r in rows:
        if (r["same_as"] or r["name"]) in zero_shot:
            r["zero_shot"] = zero_shot[r["same_as"] or r["name"]]
    any_score = next(iter(coarse.values()))
    result = {
        "header": run_header(threads=args.threads, rounds=args.rounds, run=str(run), overrides=overrides,
                             ppl=f"llama.cpp, WikiText-2 raw test, windows of {args.seq_len}: the points the "
                                 f"comparisons rest on (and only they are compared) on every {args.ppl_stride}-th, "
                                 f"the rest of the front on every {select}-th ({any_score['windows']} of "
                                 f"{any_score['of_windows']} windows); each row's ppl_windows says which",
                             zero_shot={"tasks": args.tasks, "limit": args.limit, "piqa_limit": args.piqa_limit},
                             timing="llama.cpp decode, context 256, batch 1: median over interleaved rounds of "
                                    "each session's minimum; interval: order statistics of the median"),
        "targets_ms": targets,
        "points": rows,
        "comparisons": comparisons,
    }
    (ROOT / "results").mkdir(exist_ok=True)
    atomic_write_json(ROOT / "results" / f"{args.output}.json", result)
    plot(rows, comparisons, ROOT / "results" / f"{args.output}.png")
    print(markdown(result))
    print(f"wrote results/{args.output}.json and .png")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
