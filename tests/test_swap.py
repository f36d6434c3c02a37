"""``to_runtime``: the one swap onto QuantLinear (the export's ``pack_model`` and the latency timers use it)."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_model, tiny_space, token_ids

from archquant.backends import Backend, BackendError
from archquant.core.linears import LINEARS, MODULE_PATHS
from archquant.kernels.qlinear import QuantLinear
from archquant.kernels.swap import linear_module_names, to_runtime
from archquant.models.fake_quant_linear import FakeQuantLinear
from archquant.supernet import Arch, build, materialize


@pytest.fixture(scope="module")
def sn():
    return build(tiny_model(layers=2), tiny_space(), backend="torch")


def _arch(sn, lm_head_bits: int) -> Arch:
    """Mixed bits per linear, 8-bit activations in block 1; the head at ``lm_head_bits`` (16: tied)."""
    gates = sn.space.gates()
    choice = {n: v[0] for n, v in gates.items()}
    choice.update({"layers.0.wbits.qkv": 4, "layers.0.wbits.down": 8, "layers.1.wbits.gate_up": 4,
                   "layers.1.abits": 8, "lm_head.wbits": lm_head_bits})
    return Arch.from_choices(sn.space, choice)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_linear_names_are_the_models_linears(sn):
    sub = materialize(sn, _arch(sn, 4))
    assert linear_module_names(2) == [n for n, m in sub.named_modules() if isinstance(m, FakeQuantLinear)]


def test_swap_takes_the_configs_bits_and_computes_the_fake_quant_forward(sn):
    sub = materialize(sn, _arch(sn, 4))
    swapped = to_runtime(sub, paths=("dense",), copy=True)
    for i, layer in enumerate(swapped.model.layers):
        wbits, abits = sub.config.layer_quant(i)
        for lin in LINEARS:
            mod = layer.get_submodule(MODULE_PATHS[lin])
            assert isinstance(mod, QuantLinear) and (mod.wbits, mod.abits) == (wbits[lin], abits), (i, lin)
    assert isinstance(swapped.lm_head, QuantLinear) and (swapped.lm_head.wbits, swapped.lm_head.abits) == (4, 16)
    assert isinstance(sub.lm_head, FakeQuantLinear)  # copy=True left the subnet as it was
    ids = token_ids(2, 12)
    ref = _logits(sub, ids)
    # same quantiser, same integers; fake-quant adds (Q(w) - w) to w, which can differ from Q(w) by 1 ulp
    assert (_logits(swapped, ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_tied_head_is_shared_or_swapped_and_a_second_swap_changes_nothing(sn):
    sub = materialize(sn, _arch(sn, 16))
    assert sub.config.tie_word_embeddings
    kept = to_runtime(sub, paths=("dense",), keep_tied_head=True, copy=True)
    assert kept.lm_head.weight is kept.model.embed_tokens.weight
    own = to_runtime(sub, paths=("dense",), copy=True)  # what the profiler times: the head as its own op
    assert isinstance(own.lm_head, QuantLinear) and own.lm_head.wbits == 16
    before = dict(own.named_modules())
    assert to_runtime(own) is own and dict(own.named_modules()) == before


def test_float_dtype_rounds_only_the_16_bit_weights(sn):
    sub = materialize(sn, _arch(sn, 4))
    half = to_runtime(sub, paths=("dense",), float_dtype=torch.float16, copy=True)
    full = to_runtime(sub, paths=("dense",), copy=True)
    o16, o32 = half.model.layers[0].self_attn.o_proj, full.model.layers[0].self_attn.o_proj
    assert o16.wbits == 16 and o16.weight.dtype == torch.float16
    assert torch.equal(o16.weight, sub.model.layers[0].self_attn.o_proj.weight.half())
    assert o32.weight.dtype == torch.float32 and torch.equal(o32.weight, sub.model.layers[0].self_attn.o_proj.weight)
    q16, q32 = half.model.layers[0].self_attn.q_proj, full.model.layers[0].self_attn.q_proj
    assert q16.wbits == 4 and torch.equal(q16.qweight, q32.qweight) and torch.equal(q16.scales, q32.scales)


def test_a_backend_with_its_own_quantiser_is_refused(sn):
    class OwnFormat(Backend):
        name = "own"

        def fake_quant_weight(self, w, bits, group_size):
            return w

    with pytest.raises(BackendError, match="quantises differently"):
        to_runtime(materialize(sn, _arch(sn, 4)), backend=OwnFormat())
