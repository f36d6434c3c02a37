"""Benchmark the supernet's weight mixing ``W_eff = sum_k pi_k Q_k(W)`` on one large linear.

Compares, forward and forward + backward (gradient to ``pi``), on SmolLM2-135M's lm_head shape
(49152 x 576, fp32) by default:

  * ``mv``: one ``torch.mv`` over the transposed ``[K, N*K_in]`` stack of every choice (``quant.mix_weights``);
  * ``choices``: what ``ElasticLinear`` runs (``WeightChoices.mix``): the 16-bit choice is the weight itself,
    and on CPU the sum is K scaled in-place adds (``quant.mix_choices``).

Interleaved repeats, medians; prints and writes ``results/bench_mix.json``.

    python scripts/bench_mix.py
    python scripts/bench_mix.py --rows 1536 --cols 576 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from archquant.backends import get_backend
from archquant.supernet.quant import QuantCache, backend_quantiser, mix_weights
from archquant.utils.env import run_header
from archquant.utils.io import atomic_write_json


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=49152)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/bench_mix.json")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.rows < 1 or args.cols < 1:
        ap.error("--rows, --cols and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    backend = get_backend("torch")
    w = torch.randn(args.rows, args.cols)
    stack = torch.stack([backend.fake_quant_weight(w, b, 64) for b in bits])  # every choice, 16-bit copy included
    choices = QuantCache().all(w, lambda: w, bits, backend_quantiser(backend, 64), 0)
    pi0 = torch.softmax(torch.randn(len(bits)), 0)

    def run(kind: str, backward: bool):
        pi = pi0.clone().requires_grad_(backward)
        out = mix_weights(stack, pi) if kind == "mv" else choices.mix(pi, list(range(len(bits))))
        if backward:
            out.sum().backward()
        return out

    torch.testing.assert_close(run("mv", False), run("choices", False), rtol=1e-5, atol=1e-5)
    cases = [(k, b) for b in (False, True) for k in ("mv", "choices")]
    times = {c: [] for c in cases}
    for c in cases:  # warm-up
        run(*c)
    for _ in range(args.repeats):
        for c in cases:
            t = time.perf_counter()
            run(*c)
            times[c].append((time.perf_counter() - t) * 1e3)
    med = {f"{k}{'+backward' if b else ''}": round(statistics.median(v), 2) for (k, b), v in times.items()}
    result = {
        "header": run_header(threads=args.threads),
        "setup": {"rows": args.rows, "cols": args.cols, "bits": bits, "repeats": args.repeats, "dtype": "float32"},
        "ms": med,
        "speedup": {"forward": round(med["mv"] / med["choices"], 2),
                    "forward+backward": round(med["mv+backward"] / med["choices+backward"], 2)},
        "cache_mb": {"mv": round(stack.numel() * 4 / 1e6, 1), "choices": round(choices.nbytes_owned(w) / 1e6, 1)},
    }
    for k, v in med.items():
        print(f"{k:<18} {v:8.2f} ms")
    print(f"speedup: {result['speedup']}; cached copies {result['cache_mb']} MB")
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
