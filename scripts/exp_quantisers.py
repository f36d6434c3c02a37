"""Activation-weighted weight error per GGUF type: round-to-nearest, llama.cpp's quantiser (without and
with an imatrix), and archquant's importance-weighted quantiser, on the embedded default's real weights.

Layers 0, 15 and 29 (all 7 linears; block-256 types only on ffn_down, whose rows are 1536 = 6 x 256) are
written as a 3-layer F32 GGUF, quantised by ``llama_cpp.llama_model_quantize`` per type (pure: every
tensor in that type) and read back with gguf-py. Importance = mean of x^2 per input channel over
calibration tokens. Error = sum_ij imp_j (w_ij - wq_ij)^2 / sum_ij imp_j w_ij^2, summed over tensors.

Run: ``PYTHONPATH=$PWD nice -n 19 python scripts/exp_quantisers.py`` -> results/exp_quantisers.{json,png}
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from archquant.core.linears import LINEARS, MODULE_PATHS, gguf_name
from archquant.data import calibration_blocks
from archquant.engine.gguf_writer import export_gguf
from archquant.engine.presets import quantize_gguf
from archquant.models.embedded import ensure_embedded_gguf
from archquant.models.registry import load_model
from archquant.quant import gguf as quant

LAYERS = (0, 15, 29)
NUM_BLOCKS = 8  # calibration blocks for the activation statistics
# llama_ftype per type (llama.h); K types use the *_S / plain ftype, ``pure`` makes every tensor that type
# type -> the llama-quantize preset whose pure form stores every tensor in that type
FTYPES = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q5_K": "Q5_K_S", "Q4_1": "Q4_1",
          "Q4_0": "Q4_0", "Q4_K": "Q4_K_S", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q3_K": "Q3_K_S"}
OUT = Path("results")


def activation_stats(model, tokens: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Mean of x^2 per input channel of each linear of ``LAYERS``. Shape: ``[K]`` each."""
    sums, hooks = {}, []
    for layer in LAYERS:
        block = model.model.layers[layer]
        for lin in LINEARS:
            mod = block.get_submodule(MODULE_PATHS[lin])

            def hook(_m, args, _out, key=(layer, lin)):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                s, n = sums.get(key, (0.0, 0))
                sums[key] = (s + (x * x).sum(0), n + x.shape[0])

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for row in tokens:
            model(row[None])
    for h in hooks:
        h.remove()
    return {k: s / n for k, (s, n) in sums.items()}


def llama_quantize(src: Path, dst: Path, qtype: str, imatrix: dict[str, np.ndarray] | None) -> None:
    """``llama_model_quantize`` of ``src`` to ``qtype`` (pure), with per-tensor importance if given; the embedding
    stays F32 (out of the comparison, and fast)."""
    quantize_gguf(src, dst, FTYPES[qtype], threads=2, pure=True, imatrix=imatrix, token_embedding_type=0)


def read_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in GGUFReader(path).tensors}


def main() -> None:
    t0 = time.time()
    torch.set_num_threads(2)
    model, tok = load_model()
    tokens = calibration_blocks(tok)[:NUM_BLOCKS]
    imp = activation_stats(model, tokens)
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in LAYERS])
    model.config.num_hidden_layers = len(LAYERS)
    names = {(layer, lin): gguf_name(lin, i) for i, layer in enumerate(LAYERS) for lin in LINEARS}
    imatrix = {names[k]: v.numpy() for k, v in imp.items()}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="exp-quantisers-") as tmp:
        f32 = export_gguf(model, Path(tmp) / "f32.gguf", source_gguf=ensure_embedded_gguf(), types={16: "F32"})
        src = read_tensors(f32)
        weights = {k: torch.from_numpy(np.ascontiguousarray(src[n][1]).copy()) for k, n in names.items()}
        for qtype in FTYPES:
            keys = [k for k in names if weights[k].shape[1] % quant.block_size(qtype) == 0]
            rows = {}
            for label, imx in (("llama_cpp", None), ("llama_cpp_imatrix", imatrix)):
                dst = Path(tmp) / f"{qtype}-{label}.gguf"
                llama_quantize(f32, dst, qtype, imx)
                got = read_tensors(dst)
                rows[label] = {}
                for k in keys:
                    gtype, raw = got[names[k]]
                    assert gtype == qtype, (names[k], gtype, qtype)
                    rows[label][k] = quant.dequantize_raw(raw, qtype)
                dst.unlink()
            rows["rtn"] = {k: quant.weight_as_type(weights[k], qtype) for k in keys}
            rows["archquant"] = {k: quant.weight_as_type(weights[k], qtype, imp[k], name=names[k]) for k in keys}
            norm = sum(quant.weighted_error(weights[k], torch.zeros_like(weights[k]), imp[k]) for k in keys)
            results[qtype] = {"tensors": [names[k] for k in keys], **{
                m: sum(quant.weighted_error(weights[k], rows[m][k], imp[k]) for k in keys) / norm
                for m in ("rtn", "llama_cpp", "llama_cpp_imatrix", "archquant")}}
            r = results[qtype]
            print(f"{qtype:7s} n={len(keys):2d}  rtn {r['rtn']:.3e}  llama.cpp {r['llama_cpp']:.3e}  "
                  f"+imatrix {r['llama_cpp_imatrix']:.3e}  archquant {r['archquant']:.3e}", flush=True)
    import llama_cpp

    OUT.mkdir(exist_ok=True)
    meta = {"version": 1, "layers": list(LAYERS), "calibration_blocks": int(tokens.shape[0]),
            "tokens": int(tokens.numel()), "llama_cpp_python": llama_cpp.__version__,
            "metric": "sum_ij imp_j (w_ij - wq_ij)^2 / sum_ij imp_j w_ij^2 over the listed tensors",
            "seconds": round(time.time() - t0, 1)}
    (OUT / "exp_quantisers.json").write_text(json.dumps({**meta, "types": results}, indent=1))
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ("rtn", "llama_cpp", "llama_cpp_imatrix", "archquant")
    types = list(results)
    x = np.arange(len(types))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, m in enumerate(methods):
        ax.bar(x + (i - 1.5) * 0.2, [results[t][m] for t in types], 0.2, label=m)
    ax.set_xticks(x, types)
    ax.set_yscale("log")
    ax.set_ylabel("activation-weighted relative error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "exp_quantisers.png", dpi=120)


if __name__ == "__main__":
    main()
