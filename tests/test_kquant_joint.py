"""A block-256 GGUF type is a joint decision with the widths.

The choice ``Q4_K`` stores Q4_K in a tensor whose row length (set by the hidden / MLP / heads gates) is a multiple
of 256 and llama.cpp's fallback Q5_0 elsewhere; the supernet, the materialised subnet, the GGUF writer and the
latency model must all agree on which, tensor by tensor. Model: hidden 288 (choices 288 / 256), MLP 512 (512 / 384 /
256), 9 heads of 32 (attention width 288), so every kind of linear meets both cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archquant.backends.base import BackendError
from archquant.backends.llamacpp import FALLBACK, LlamaCppBackend, space_types, stored_type, types_from_names
from archquant.engine.gguf_writer import export_gguf
from archquant.latency.llamacpp_profiler import CostModel, SubnetShape
from archquant.latency.model import LatencyModel
from archquant.latency.table import LatencyTable
from archquant.quant import gguf as quant
from archquant.supernet import Arch, build, materialize
from tests._tiny import tiny_space, token_ids

TOL = 1e-4  # as tests/test_supernet_exact.py: the sliced path differs from the materialised model by 0


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def sn(tmp_path_factory):
    from archquant.models.registry import load_model

    model, tok = load_model("tiny-llama", tiny_overrides={"num_hidden_layers": 2, "hidden_size": 288,
                                                         "intermediate_size": 512, "num_attention_heads": 9,
                                                         "num_key_value_heads": 3, "head_dim": 32})
    # slots {8: Q8_0, 6: Q6_K, 5: Q5_0, 4: Q4_K}: the activation formats alternate (Q8_0, Q8_K, Q8_0, Q8_K)
    space = tiny_space(hidden=[1.0, 0.889], mlp=[1.0, 0.75, 0.5], kv_groups=[1.0], wbits=[16, 8, 6, 5, 4],
                       lm_head_bits=[16, 8])
    backend = LlamaCppBackend(types_from_names(["Q8_0", "Q6_K", "Q5_0", "Q4_K"]))
    sn = build(model, space, backend=backend, calib_ids=token_ids(rows=4, seq=32, seed=1),
               cache_dir=tmp_path_factory.mktemp("cache"))
    sn.tokenizer = tok
    return sn


def _arch(sn, hidden: int) -> Arch:
    """Every linear at the 4-bit choice (Q4_K), MLP 384 in block 0 and 512 in block 1."""
    choice = {n: 4 for n in sn.space.gates() if ".wbits." in n}
    return Arch.from_choices(sn.space, {**choice, "hidden": hidden, "layers.0.mlp": 384, "layers.1.mlp": 512})


def test_the_stored_type_follows_the_row_length():
    assert stored_type("Q4_K", 512) == "Q4_K" and stored_type("Q4_K", 576) == "Q5_0"
    assert stored_type("Q4_0", 576) == "Q4_0" and stored_type("Q4_K", None) == "Q4_K"
    assert all(stored_type(t, 256 + 32) == FALLBACK[t] for t in FALLBACK)
    with pytest.raises(BackendError, match=r"Q4_K needs rows that are multiples of 256, not 576.*latency.fallback=true"):
        stored_type("Q4_K", 576, fallback=False)
    with pytest.raises(BackendError, match=r"Q4_0 needs rows that are multiples of 32, not 48"):
        stored_type("Q4_0", 48)
    be = LlamaCppBackend({4: "Q4_K"})
    assert be.weight_bytes(256 * 10, 4, 32, row=256) == quant.type_nbytes(2560, "Q4_K")
    assert be.weight_bytes(288 * 10, 4, 32, row=288) == quant.type_nbytes(2880, "Q5_0")


@pytest.mark.parametrize("hidden", [256, 288])
def test_gguf_holds_the_joint_types_bit_for_bit_as_the_supernet_computes(sn, hidden, tmp_path):
    from gguf import GGUFReader

    from archquant.quant.gguf import dequantize_raw
    arch = _arch(sn, hidden)
    sub = materialize(sn, arch)
    ids = token_ids(seed=3)
    with torch.no_grad():
        assert (sn(ids, sn.arch_probs(arch)) - sub(ids).logits).abs().max() <= TOL
    tensors = {t.name: t for t in GGUFReader(export_gguf(sub, tmp_path / "k.gguf", tokenizer=sn.tokenizer)).tensors}
    q_type = "Q4_K" if hidden == 256 else "Q5_0"
    want = {"blk.0.attn_q.weight": q_type, "blk.0.ffn_up.weight": q_type, "blk.0.attn_output.weight": "Q5_0",
            "blk.0.ffn_down.weight": "Q5_0", "blk.1.ffn_down.weight": "Q4_K"}  # rows: hidden, hidden, 288, 384, 512
    assert {n: tensors[n].tensor_type.name for n in want} == want
    layers = sub.model.layers
    for name, mod in (("blk.0.attn_v.weight", layers[0].self_attn.v_proj), ("blk.0.ffn_up.weight", layers[0].mlp.up_proj),
                      ("blk.0.ffn_down.weight", layers[0].mlp.down_proj),
                      ("blk.1.ffn_down.weight", layers[1].mlp.down_proj)):
        got = dequantize_raw(np.asarray(tensors[name].data), tensors[name].tensor_type.name).reshape(mod.weight.shape)
        torch.testing.assert_close(got, mod.quantized_weight().float(), rtol=0, atol=0)


def test_latency_and_memory_price_each_tensor_as_the_type_it_stores(sn, tmp_path):
    """The table prices a linear at (row, bits) as its stored type; a subnet's prediction is the per-op cost model
    summed over the very types its GGUF holds, and the expected memory contracts width and type jointly."""
    from gguf import GGUFReader

    from archquant.search.loop import onehot_probs

    be, space = sn.backend, sn.space
    lin, lm = space_types(space, be)
    assert {"Q4_K", "Q5_0", "Q8_0", "F16"} <= set(lin)
    cm = CostModel(lin, lm)
    coef = np.zeros(len(cm.names))
    for i, name in enumerate(cm.names):
        coef[i] = 0.01 * (1 + i % 7)  # distinct costs per type and per op
    table = LatencyTable(header={"backend": "llamacpp", "scenario": "decode", "model": space.fingerprint},
                         ops=cm.table_ops(coef, space, be.gguf_type))
    lm_model = LatencyModel(space, table, be)
    for hidden in (256, 288):
        arch = _arch(sn, hidden)
        shape = SubnetShape.from_arch(arch, space, be.gguf_type)
        assert shape.types[0]["q"] == ("Q4_K" if hidden == 256 else "Q5_0") and shape.types[1]["down"] == "Q4_K"
        assert lm_model.predict_ms(arch, corrected=False) == pytest.approx(float(cm.features(shape) @ coef), rel=1e-6)
    # the expected memory contracts width and type jointly: one-hot widths give each subnet's GGUF bytes (norms
    # counted at 16 bits, as the model prices them; the GGUF keeps them in F32), a soft width their mixture
    probs = {n: p.double() for n, p in onehot_probs(space, _arch(sn, 288)).items()}
    mb = {}
    for hidden in (256, 288):
        probs["hidden"] = torch.tensor([float(hidden == 288), float(hidden == 256)], dtype=torch.float64)
        mb[hidden] = float(lm_model.expected_mb(probs))
        tensors = GGUFReader(export_gguf(materialize(sn, _arch(sn, hidden)), tmp_path / f"{hidden}.gguf",
                                         tokenizer=sn.tokenizer)).tensors
        nbytes = sum(int(t.n_bytes) // (2 if "norm" in t.name else 1) for t in tensors)
        assert mb[hidden] * 1e6 == pytest.approx(nbytes, rel=1e-9), hidden
    probs["hidden"] = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert float(lm_model.expected_mb(probs)) == pytest.approx(0.3 * mb[288] + 0.7 * mb[256], rel=1e-9)


@pytest.mark.parametrize("mix_outputs", [0, 10**6], ids=["mixed-weights", "mixed-outputs"])
def test_soft_bits_mix_the_choices_of_alternating_activation_formats(sn, mix_outputs):
    """A palette whose activation formats alternate along the gate (Q8_0, Q6_K, Q5_0, Q4_K) still mixes as
    ``sum_k pi_k x_k Q_k^T``, each choice fed its own activation format."""
    from archquant.supernet.quant import mixed_act

    mlp = sn.layers[0].mlp
    lin = mlp.down_proj
    assert len(set(lin.classes)) == 3 and lin.classes[2] == lin.classes[4] != lin.classes[3]
    x = torch.randn(2, 5, lin.active_weight().shape[1], generator=torch.Generator().manual_seed(0))
    xs = mixed_act(x, sn.backend, [16], None, 0, mlp.class_bits, sorted(set(lin.classes)))
    pi = torch.softmax(torch.randn(len(lin.bits), generator=torch.Generator().manual_seed(1)), 0)
    old, lin.mix_outputs_max_tokens = lin.mix_outputs_max_tokens, mix_outputs
    try:
        with torch.no_grad():
            got = lin(xs, pi)
            want = sum(pi[k] * lin(xs, k) for k in range(len(lin.bits)))
    finally:
        lin.mix_outputs_max_tokens = old
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fallback_is_llama_cpps_own(sn, tmp_path):
    """llama-quantize with pure K presets on rows of 288 stores exactly ``FALLBACK``'s types there (and the K-quant
    itself on the 512-long ffn_down rows)."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from archquant.engine.presets import quantize_gguf

    src = export_gguf(materialize(sn, Arch.full(sn.space)), tmp_path / "src.gguf", tokenizer=sn.tokenizer,
                      types={16: "F32"})
    for preset, qtype in (("Q6_K", "Q6_K"), ("Q5_K_S", "Q5_K"), ("Q4_K_S", "Q4_K"), ("Q3_K_S", "Q3_K"),
                          ("IQ4_XS", "IQ4_XS")):
        out = quantize_gguf(src, tmp_path / f"{preset}.gguf", preset, pure=True, threads=1)
        types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == FALLBACK[qtype], preset
        assert types["blk.0.ffn_down.weight"] == qtype, preset
