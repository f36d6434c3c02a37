"""Latency tables for ``latency.backend=llamacpp``, measured in llama.cpp itself.

llama.cpp offers no per-op timer, so the table comes from whole-model timings and a regression:

1. Sample subnets of the (llama.cpp-restricted) space: depth uniform in 1..L, every other gate
   uniform. Write each as a synthetic GGUF (arch ``deci``) with random weights at exactly its shapes
   and GGUF types; random bytes with valid fp16 block scales are as fast to run as real weights.
2. Time each in llama.cpp through ``LlamaCppRunner``: decode = ms for one token at context C
   (its KV entry removed after each sample, so all samples see C); prefill = ms for S tokens from an
   empty cache. Within one session (one model load) the statistic is the minimum of the samples: on a shared machine other jobs only ever
   add time (2-thread llama.cpp slows down 10x and more when its threads are descheduled at a
   barrier), so the fastest sample is the most reproducible estimate of the engine's own latency; on
   an idle machine it is within a few percent of the median, which is recorded too.
3. Fit one non-negative least-squares model over all timings whose terms are the table's entries:
   ``linear(K, N, type) = a_t + b_t K N``; ``attention = g_h heads + g_kv kv_heads``; ``norm(d) = n d``
   (two per block + the final one); ``act(d) = u d``; ``lm_head(K, V, type) = c_t + e_t K V``;
   ``per_layer`` and ``per_token`` constants (the embedding lookup is folded into ``per_token``).
   Evaluating it at every signature the space can produce gives a table whose ``LatencyModel`` sum
   reproduces the fitted model exactly. Residuals on held-out subnets are stored in the header.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from archquant.backends.llamacpp import space_types
from archquant.engine.gguf_writer import ExportPlan, KeyValue, LayerPlan, TensorSpec, linear_shapes, write_gguf
from archquant.engine.llamacpp import LlamaCppRunner, llama_cpp_version, require_llama_cpp
from archquant.quant import gguf as quant

STATISTIC = "median over sessions of the session minimum"
DECODE_TOKENS = 24  # samples per decode session (``time_gguf``)
PREFILL_REPEATS = 5  # samples per prefill session


def per_session(scenario) -> int:
    return DECODE_TOKENS if scenario.name == "decode" else PREFILL_REPEATS


def _stat(samples: list[float]) -> float:
    """The minimum of one session's samples (see the module docstring for why not the median)."""
    return float(np.min(np.asarray(samples, dtype=np.float64)))


def session_stat(samples: list[float], per_session: int) -> float:
    """The median over sessions of each session's minimum (``samples`` concatenates sessions of ``per_session``).

    One session is what a measurement sees (``time_gguf``: one model load, one minimum). The minimum
    over many sessions is lower than a typical session's (a lucky memory placement, a quiet spell): on
    this machine by ~20%, which biased tables fitted on it against every later single-session timing.
    """
    v = np.asarray(samples, dtype=np.float64)
    k = len(v) // per_session
    if k < 2:
        return float(v.min())
    return float(np.median(v[: k * per_session].reshape(k, per_session).min(axis=1)))


@dataclass
class SubnetShape:
    """What a GGUF of one subnet contains: hidden size, per-kept-block shapes and types, lm_head type."""

    hidden: int
    head_dim: int
    vocab: int
    heads: list[int]
    kv_heads: list[int]
    mlp: list[int]
    types: list[dict[str, str]]
    lm_type: str
    embd_type: str

    @classmethod
    def from_arch(cls, arch, space, type_of: Callable[[int, int], str]) -> SubnetShape:
        """``type_of(bits, row)``: the GGUF type a tensor of input length ``row`` stores (``LlamaCppBackend.gguf_type``)."""
        fp = space.fingerprint
        kept = [arch.layers[l] for l in arch.kept_layers]

        def types(la) -> dict[str, str]:
            shapes = linear_shapes(arch.hidden, la.head_dim, la.num_heads, la.kv_groups, la.mlp)
            return {lin: type_of(b, shapes[lin][1]) for lin, b in la.wbits.items()}

        return cls(
            hidden=arch.hidden,
            head_dim=kept[0].head_dim,
            vocab=int(fp["vocab_size"]),
            heads=[la.num_heads for la in kept],
            kv_heads=[la.kv_groups for la in kept],
            mlp=[la.mlp for la in kept],
            types=[types(la) for la in kept],
            lm_type=type_of(arch.lm_head_bits, arch.hidden),
            embd_type=type_of(16, arch.hidden),
        )

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def linears(self, i: int) -> list[tuple[str, int, int, str]]:
        """``(name, K, N, type)`` of block ``i``'s seven linears."""
        shapes = linear_shapes(self.hidden, self.head_dim, self.heads[i], self.kv_heads[i], self.mlp[i])
        return [(lin, k, n, self.types[i][lin]) for lin, (n, k) in shapes.items()]

    def plan(self, *, rope_theta: float = 10000.0, rms_eps: float = 1e-5, context_length: int = 8192) -> ExportPlan:
        """The GGUF (arch ``deci``) of this shape; the lm_head is tied to the embedding when their types agree."""
        layers = [LayerPlan(i, i, self.heads[i], self.kv_heads[i], self.mlp[i], dict(self.types[i]))
                  for i in range(self.num_layers)]
        return ExportPlan(arch="deci", hidden=self.hidden, head_dim=self.head_dim, vocab=self.vocab,
                          context_length=context_length, rope_theta=rope_theta, rms_eps=rms_eps,
                          num_source_layers=self.num_layers, layers=layers, embd_type=self.embd_type,
                          output_type=None if self.lm_type == self.embd_type else self.lm_type)


# ---- synthetic GGUF -----------------------------------------------------------------------------


def synthetic_tokenizer_kv(vocab: int) -> list[KeyValue]:
    """A placeholder GPT-2-style vocabulary of ``vocab`` distinct tokens (the profiler feeds ids directly)."""
    from gguf import GGUFValueType as V

    return [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", "default", V.STRING, None),
        ("tokenizer.ggml.tokens", [f"<t{i}>" for i in range(vocab)], V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", [1] * vocab, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", [" "], V.ARRAY, V.STRING),
        ("tokenizer.ggml.eos_token_id", vocab - 1, V.UINT32, None),
    ]


def random_tensor(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """Random weights of shape ``[rows, cols]`` in GGUF type ``qtype`` (bytes with valid fp16 scales).

    Float values are random bit patterns with the exponent pinned to 2^-7 (magnitudes in [2^-7, 2^-6),
    random sign): generated as integers, 10x faster than normal samples, and never inf or denormal.
    Block scales are 2^-7 likewise.
    """
    from gguf import GGMLQuantizationType

    if qtype == "F32":
        bits = rng.integers(0, 2**32, size=(rows, cols), dtype=np.uint32)
        return ((bits & np.uint32(0x807FFFFF)) | np.uint32(0x3C000000)).view(np.float32), None
    if qtype == "F16":
        bits = rng.integers(0, 2**16, size=(rows, cols), dtype=np.uint16)
        return ((bits & np.uint16(0x83FF)) | np.uint16(0x2000)).view(np.float16), None
    per_block, nbytes = quant.TYPE_SIZES[qtype]
    nb = cols // per_block
    blocks = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    scale = np.full((rows, nb, 1), 2.0**-7, dtype=np.float16).view(np.uint8)
    blocks[..., 0:2] = scale
    if qtype == "Q4_1":
        blocks[..., 2:4] = np.full((rows, nb, 1), -(2.0**-4), dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, nb * nbytes), GGMLQuantizationType[qtype]


def write_synthetic_gguf(shape: SubnetShape, path: str | Path, *, seed: int = 0, rope_theta: float = 10000.0,
                         rms_eps: float = 1e-5, context_length: int = 8192) -> Path:
    """A runnable GGUF (arch ``deci``) with random weights at exactly ``shape``'s shapes and types (norms are 1)."""
    rng = np.random.default_rng(seed)

    def tensor(spec: TensorSpec) -> tuple[np.ndarray, Any]:
        if len(spec.shape) == 1:
            return np.ones(spec.shape, dtype=np.float32), None
        return random_tensor(*spec.shape, spec.type, rng)

    plan = shape.plan(rope_theta=rope_theta, rms_eps=rms_eps, context_length=context_length)
    return write_gguf(path, plan, synthetic_tokenizer_kv(shape.vocab), tensor, name="archquant-latency-probe")


# ---- regression model ---------------------------------------------------------------------------


class CostModel:
    """The linear cost model whose parameters the regression fits (names = table entries)."""

    def __init__(self, qtypes: list[str], lm_qtypes: list[str]) -> None:
        self.qtypes = sorted(set(qtypes))
        self.lm_qtypes = sorted(set(lm_qtypes))
        self.names = (
            ["per_token", "per_layer", "norm_d", "act_d", "attn_heads", "attn_kv"]
            + [f"lin_{t}_a" for t in self.qtypes] + [f"lin_{t}_kn" for t in self.qtypes]
            + [f"lm_{t}_a" for t in self.lm_qtypes] + [f"lm_{t}_kn" for t in self.lm_qtypes]
        )
        self.index = {n: i for i, n in enumerate(self.names)}

    def features(self, s: SubnetShape) -> np.ndarray:
        """One design row: how often each parameter's unit occurs in one forward of ``s``."""
        x = np.zeros(len(self.names))
        L = s.num_layers
        x[self.index["per_token"]] = 1.0
        x[self.index["per_layer"]] = L
        x[self.index["norm_d"]] = (2 * L + 1) * s.hidden
        x[self.index["act_d"]] = sum(s.mlp)
        x[self.index["attn_heads"]] = sum(s.heads)
        x[self.index["attn_kv"]] = sum(s.kv_heads)
        for i in range(L):
            for _, k, n, t in s.linears(i):
                x[self.index[f"lin_{t}_a"]] += 1.0
                x[self.index[f"lin_{t}_kn"]] += k * n / 1e6
        x[self.index[f"lm_{s.lm_type}_a"]] = 1.0
        x[self.index[f"lm_{s.lm_type}_kn"]] = s.hidden * s.vocab / 1e6
        return x

    def fit(self, X: np.ndarray, y: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
        """Non-negative least squares on relative error (rows weighted by 1/y), with a tiny ridge.

        The ridge only picks one split among parameters that always occur together (the
        ``lin_*_a`` intercepts and ``per_layer``; ``lm_*_a`` and ``per_token``); predictions do not depend on it.
        """
        from scipy.optimize import nnls

        wts = 1.0 / np.maximum(y, 1e-9)
        A = X * wts[:, None]
        b = y * wts
        scale = np.maximum(np.abs(A).max(axis=0), 1e-12)  # column scaling for conditioning
        A_s = A / scale
        A_aug = np.vstack([A_s, math.sqrt(ridge) * np.eye(A_s.shape[1])])
        b_aug = np.concatenate([b, np.zeros(A_s.shape[1])])
        coef, _ = nnls(A_aug, b_aug, maxiter=50 * A_s.shape[1])
        return coef / scale

    def table_ops(self, coef: np.ndarray, space, type_of: Callable[[int, int], str]) -> dict[str, list[dict[str, Any]]]:
        """Every op signature the space can produce, priced by the fitted parameters (``type_of(bits, K)``: the type
        a linear of input length K stores, so a block-256 choice is priced as its fallback where K needs one)."""
        from archquant.latency.signatures import enumerate_signatures

        p = {n: float(coef[i]) for i, n in enumerate(self.names)}
        sigs = enumerate_signatures(space)
        ops: dict[str, list[dict[str, Any]]] = {}

        def lin_ms(prefix, k, n, bits):
            t = type_of(int(bits), int(k))
            return p.get(f"{prefix}_{t}_a", 0.0) + p.get(f"{prefix}_{t}_kn", 0.0) * k * n / 1e6

        ops["linear"] = [{**s, "ms": round(lin_ms("lin", s["K"], s["N"], s["wbits"]), 7)} for s in sigs["linear"]]
        ops["lm_head"] = [{**s, "ms": round(lin_ms("lm", s["K"], s["N"], s["wbits"]), 7)} for s in sigs["lm_head"]]
        ops["attention"] = [{**s, "ms": round(p["attn_heads"] * s["heads"] + p["attn_kv"] * s["kv_heads"], 7)}
                            for s in sigs["attention"]]
        ops["norm"] = [{**s, "ms": round(p["norm_d"] * s["d"], 7)} for s in sigs["norm"]]
        ops["act"] = [{**s, "ms": round(p["act_d"] * s["d"], 7)} for s in sigs.get("act", [])]
        ops["embedding"] = [{**s, "ms": 0.0} for s in sigs["embedding"]]
        ops["overhead"] = [{"name": "per_layer", "ms": round(p["per_layer"], 7)},
                           {"name": "per_token", "ms": round(p["per_token"], 7)}]
        return ops


# ---- timing -------------------------------------------------------------------------------------


def time_gguf(path: str | Path, scenario, *, threads: int = 2, decode_tokens: int = DECODE_TOKENS,
              prefill_repeats: int = PREFILL_REPEATS) -> dict:
    """ms of one scenario forward of a GGUF in llama.cpp: ``{"ms": minimum, "median", "samples"}``."""
    if scenario.batch != 1:
        raise ValueError(f"llama.cpp timing supports batch 1 (CPU serving); latency.batch={scenario.batch}")
    if scenario.name == "decode":
        n_ctx = scenario.context + 8
        with LlamaCppRunner(path, n_ctx=n_ctx, n_threads=threads, n_batch=min(512, max(32, scenario.context)),
                            check=False) as r:
            res = r.time_decode(context=scenario.context, tokens=decode_tokens, warmup=2)
    else:
        s = scenario.prefill_len
        with LlamaCppRunner(path, n_ctx=s, n_threads=threads, n_batch=s, check=False) as r:
            res = r.time_prefill(length=s, repeats=prefill_repeats, warmup=1)
    return {"ms": _stat(res["samples"]), "median": float(np.median(res["samples"])), "samples": res["samples"]}


def sample_archs(space, n: int, rng: random.Random) -> list:
    """``n`` random subnets with depth uniform in 1..L (and every other gate uniform)."""
    from archquant.core.arch import Arch

    out = []
    L = space.num_layers
    for _ in range(n):
        arch = Arch.random(space, rng)
        depth = rng.randint(1, L) if space.depth else L
        keep = set(rng.sample(range(L), depth))
        for l, la in enumerate(arch.layers):
            la.keep = l in keep
        out.append(arch)
    return out


def profile_table(model, space, scenario, latency_cfg=None, *, backend=None, budget_s: float | None = None,
                  threads: int | None = None, seed: int = 0, holdout: float = 0.2, min_models: int = 12,
                  max_models: int = 80, dump: str | Path | None = None, log: Callable[[str], None] = print):
    """Time synthetic subnets of ``space`` in llama.cpp and fit a ``LatencyTable`` (not saved).

    Args:
        model: the base model (only its config is read).
        space: the resolved, llama.cpp-restricted space.
        scenario: ``Scenario`` (decode at context C, or prefill of S tokens; batch 1).
        latency_cfg: ``LatencyConfig``; ``min_run_time`` scales the time budget (0.1 -> 8 minutes).
        backend: ``LlamaCppBackend`` (its ``types`` decide which GGUF type each bit-width is).
        budget_s: wall-clock budget for timing (overrides the config-derived one).
        threads: llama.cpp threads (default: torch's thread count, the one in the device name).
        holdout: fraction of timed subnets kept out of the fit to report prediction error.
        min_models: time at least this many subnets even past the budget.
        max_models: stop adding subnets here; the rest of the budget re-times them.
        dump: also write every subnet's shape and samples here (JSON), to refit offline.
    """
    import torch

    from archquant.backends.llamacpp import LlamaCppBackend
    from archquant.latency.runtime import machine_load

    require_llama_cpp()
    backend = backend or LlamaCppBackend()
    threads = int(threads or torch.get_num_threads())
    if budget_s is None:
        mrt = getattr(latency_cfg, "min_run_time", 0.1) if latency_cfg is not None else 0.1
        budget_s = 480.0 * min(1.0, mrt / 0.1)
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    cm = CostModel(*space_types(space, backend))
    rng = random.Random(seed)
    load_start = machine_load()
    t0 = time.perf_counter()
    shapes: list[SubnetShape] = []
    samples: list[list[float]] = []
    paths: list[Path] = []
    log(f"profiling llama.cpp ({threads} threads, {scenario.header()}) for ~{budget_s:.0f} s on synthetic subnets")
    with tempfile.TemporaryDirectory(prefix="archquant-llamacpp-") as tmp:
        # Pass 1 times new subnets until half the budget (or max_models); later passes re-time the same
        # files in a new order and keep every sample, so a subnet timed during a busy spell gets
        # another chance at a quiet one (each pass is one more session for ``session_stat``).
        while (time.perf_counter() - t0 < budget_s / 2 or len(shapes) < min_models) and len(shapes) < max_models:
            arch = sample_archs(space, 1, rng)[0]
            shape = SubnetShape.from_arch(arch, space, backend.gguf_type)
            path = write_synthetic_gguf(shape, Path(tmp) / f"m{len(shapes)}.gguf", seed=len(shapes),
                                        rope_theta=float(rope), rms_eps=float(getattr(cfg, "rms_norm_eps", 1e-5)))
            samples.append(time_gguf(path, scenario, threads=threads)["samples"])
            shapes.append(shape)
            paths.append(path)
            if len(shapes) % 10 == 0:
                log(f"  {len(shapes)} subnets timed, {time.perf_counter() - t0:.0f} s")
        passes = 1
        order = list(range(len(shapes)))
        while time.perf_counter() - t0 < budget_s:
            rng.shuffle(order)
            for j in order:
                if time.perf_counter() - t0 >= budget_s:
                    break
                samples[j] += time_gguf(paths[j], scenario, threads=threads)["samples"]
            passes += 1
        log(f"  {len(shapes)} subnets, {passes} passes, {time.perf_counter() - t0:.0f} s")
    if dump is not None:
        from archquant.utils.io import atomic_write_json

        atomic_write_json(dump, {"scenario": scenario.header(), "threads": threads, "per_session": per_session(scenario),
                                 "features": cm.names, "subnets": [
                                     {"shape": dataclasses.asdict(s), "features": cm.features(s).tolist(), "samples": v}
                                     for s, v in zip(shapes, samples)]})
    return fit_table(shapes, samples, space=space, scenario=scenario, backend=backend, threads=threads, seed=seed,
                     holdout=holdout, log=log, extra_header={
                         "profile_seconds": round(time.perf_counter() - t0, 1),
                         "machine_load": {"start": load_start, "end": machine_load()}})


def fit_table(shapes: list[SubnetShape], samples: list[list[float]], *, space, scenario, backend, threads: int,
              seed: int = 0, holdout: float = 0.2, log: Callable[[str], None] = print,
              extra_header: dict | None = None):
    """Fit the per-op cost model to timed subnets and return the ``LatencyTable`` (not saved).

    Args:
        shapes, samples: each subnet's shape and its timings (sessions of ``per_session(scenario)``).
        extra_header: more header fields (profiling time, machine load, provenance of a refit).
    """
    from archquant.latency.table import LatencyTable
    from archquant.utils.env import device_name, now, versions

    types = backend.types
    cm = CostModel(*space_types(space, backend))
    n_per = per_session(scenario)
    rows = [cm.features(s) for s in shapes]
    ys = [session_stat(v, n_per) for v in samples]
    medians = [float(np.median(v)) for v in samples]
    X, y = np.stack(rows), np.asarray(ys)
    n_hold = int(len(y) * holdout) if len(y) >= 10 else 0
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:n_hold], order[n_hold:]
    coef = cm.fit(X[train], y[train])
    fit = {}
    if n_hold:
        rel = np.abs(X[test] @ coef - y[test]) / y[test]
        fit["holdout"] = {"n": int(n_hold), "median_rel_err": round(float(np.median(rel)), 4),
                          "max_rel_err": round(float(rel.max()), 4)}
    coef = cm.fit(X, y)  # the table uses every timing
    rel = np.abs(X @ coef - y) / y
    fit["train"] = {"n": int(len(y)), "median_rel_err": round(float(np.median(rel)), 4),
                    "max_rel_err": round(float(rel.max()), 4)}
    fit["params"] = {n: round(float(c), 8) for n, c in zip(cm.names, coef)}
    fit["median_over_statistic"] = round(float(np.median(np.asarray(medians) / y)), 4)
    tr, ho = fit["train"], fit.get("holdout")
    log(f"fit on {len(y)} subnets: median rel err {tr['median_rel_err']:.3f}, max {tr['max_rel_err']:.3f}"
        + (f"; held-out median {ho['median_rel_err']:.3f}, max {ho['max_rel_err']:.3f}" if ho else ""))
    header = {
        "device": device_name("cpu"),
        "backend": backend.name,
        **scenario.header(),
        "model": dict(space.fingerprint),
        "versions": versions(),
        "date": now(),
        "method": (
            f"llama.cpp (llama-cpp-python {llama_cpp_version()}) whole-model timings of {len(y)} synthetic GGUF subnets "
            f"(random weights, exact shapes and types), {STATISTIC} of samples, NNLS fit of per-op costs"
        ),
        "threads": threads,
        "statistic": STATISTIC,
        "gguf_types": {str(k): v for k, v in types.items()},
        "flash_attn": False,
        "kv_type": "f16",
        "space": space.to_dict(),
        "fit": fit,
        "subnets": len(shapes),
        "samples_per_subnet": round(float(np.mean([len(v) for v in samples])), 1),
        **(extra_header or {}),
    }
    table = LatencyTable(header=header, ops=cm.table_ops(coef, space, backend.gguf_type))
    return LatencyTable.from_dict(table.to_dict())


def refit_llamacpp(cfg, dump: str | Path, *, out: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Rebuild the table of ``cfg``'s scenario from the raw timings a profile dumped (no re-timing)."""
    import json

    from archquant.backends import get_backend
    from archquant.core.space import resolve_space
    from archquant.latency.loader import table_path, types_tag
    from archquant.latency.scenario import Scenario
    from archquant.models.registry import load_model

    saved = json.loads(Path(dump).read_text())
    scenario = Scenario.from_config(cfg.latency)
    if saved["scenario"] != scenario.header():
        raise ValueError(f"{dump} timed {saved['scenario']}, not the configured {scenario.header()}")
    backend = get_backend("llamacpp", cfg.latency.backend_options())
    model, _ = load_model(cfg.model.name, seed=cfg.model.seed)
    space = resolve_space(backend.restrict_space(cfg.space, model.config), model.config)
    shapes = [SubnetShape(**r["shape"]) for r in saved["subnets"]]
    samples = [r["samples"] for r in saved["subnets"]]
    previous = Path(out or cfg.latency.out or table_path(cfg.model.name, backend.name, scenario, "cpu", tag=types_tag(backend)))
    extra = {"refit_from": str(dump)}
    if previous.exists():  # keep the profiling run's provenance
        old = json.loads(previous.read_text())["header"]
        extra.update({k: old[k] for k in ("profile_seconds", "machine_load") if k in old})
    table = fit_table(shapes, samples, space=space, scenario=scenario, backend=backend, threads=int(saved["threads"]),
                      log=log, extra_header=extra)
    table.save(previous)
    log(f"wrote {previous}")
    return previous


def profile_llamacpp(cfg, *, budget_s: float | None = None, out: str | Path | None = None,
                     dump: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Profile and save the llama.cpp table of ``cfg``'s model, space and scenario (``latency.*``).

    Writes ``latency_tables/<device>/<model>-llamacpp-<scenario>.json`` (or ``latency.out`` / ``out``);
    ``dump`` also keeps the raw timings (see ``profile_table``).
    """
    import torch

    from archquant.backends import get_backend
    from archquant.core.space import resolve_space
    from archquant.latency.loader import table_path, types_tag
    from archquant.latency.scenario import Scenario
    from archquant.models.registry import load_model

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    backend = get_backend("llamacpp", cfg.latency.backend_options())
    model, _ = load_model(cfg.model.name, seed=cfg.model.seed)
    space = resolve_space(backend.restrict_space(cfg.space, model.config), model.config)
    scenario = Scenario.from_config(cfg.latency)
    path = Path(out or cfg.latency.out or table_path(cfg.model.name, backend.name, scenario, "cpu", tag=types_tag(backend)))
    table = profile_table(model, space, scenario, cfg.latency, backend=backend, budget_s=budget_s, log=log,
                          dump=dump)
    table.save(path)
    log(f"wrote {path}")
    return path
