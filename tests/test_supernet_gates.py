"""Gates: vectorised Gumbel-Softmax sampling, fixing, gradients, checkpoint/resume, one-pass forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archquant.supernet import Arch, GateError, build, materialize
from tests._tiny import CountLinear, tiny_model, tiny_space, token_ids

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def sn():
    net = build(tiny_model(layers=2), tiny_space())
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def test_probs_are_softmax_of_logits_and_fixed_gates_one_hot(sn):
    probs = sn.probs()
    assert list(probs) == sn.gate_names
    for name, logit in zip(sn.gate_names, sn.arch_parameters()):
        if name in sn.fixed:
            assert torch.equal(probs[name], F.one_hot(torch.tensor(sn.fixed[name]), logit.numel()).float())
        else:
            assert torch.allclose(probs[name], torch.softmax(logit, 0), atol=1e-6)


def test_vectorised_sampling_equals_per_gate_gumbel_softmax(sn):
    tau = 0.7
    probs = sn.sample_probs(tau, generator=torch.Generator().manual_seed(3))
    # the same noise, drawn as the one [G, Kmax] matrix the gate set draws, applied gate by gate
    u = torch.rand((len(sn.gate_names), sn.gates.kmax), generator=torch.Generator().manual_seed(3))
    for i, (name, logit) in enumerate(zip(sn.gate_names, sn.arch_parameters())):
        if name in sn.fixed:
            continue
        gumbel = -torch.log(-torch.log(u[i, : logit.numel()].clamp(1e-10, 1 - 1e-7)))
        ref = torch.softmax((logit + gumbel) / tau, 0)
        assert torch.allclose(probs[name], ref, atol=1e-6), name


def test_hard_samples_are_one_hot_with_a_soft_gradient(sn):
    probs = sn.sample_probs(1.0, hard=True, generator=torch.Generator().manual_seed(1))
    for name, p in probs.items():
        assert torch.allclose(p, F.one_hot(p.argmax(), p.numel()).float(), atol=1e-6)
    loss = sum((p * torch.arange(p.numel())).sum() for n, p in probs.items() if n not in sn.fixed)
    loss.backward()
    open_grads = [lg.grad for n, lg in zip(sn.gate_names, sn.arch_parameters()) if n not in sn.fixed]
    assert all(g is not None and g.abs().sum() > 0 for g in open_grads)


def test_samples_are_reproducible_and_temperature_checked(sn):
    a = sn.sample_probs(0.5, generator=torch.Generator().manual_seed(7))
    b = sn.sample_probs(0.5, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(GateError, match="temperature"):
        sn.sample_probs(0.0)


def test_only_gate_logits_receive_gradients_when_weights_are_frozen(sn):
    logits = sn(token_ids(), sn.sample_probs(1.0, generator=torch.Generator().manual_seed(2)))
    logits.square().mean().backward()
    assert all(p.grad is None for p in sn.weight_parameters())
    for name, p in zip(sn.gate_names, sn.arch_parameters()):
        if name not in sn.fixed:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_trainable_weights_get_straight_through_gradients():
    net = build(tiny_model(layers=1), tiny_space(), train_weights=True)
    net(token_ids(), net.sample_probs(1.0)).square().mean().backward()
    grads = [p.grad for p in net.weight_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_eval_without_probs_runs_the_argmax_arch(sn):
    ids = token_ids(seed=3)
    arch = sn.argmax_arch()
    with torch.no_grad():
        out = sn(ids)
        assert torch.equal(out, sn(ids, sn.arch_probs(arch)))
        assert (out - materialize(sn, arch)(ids).logits).abs().max() <= 1e-4


def test_fix_gate_validates_and_drops_branches(sn):
    sn.fix_gate("layers.0.mlp", 2)  # 128 of 256 neurons
    assert sn.layers[0].mlp.down_proj.active_weight().shape == (128, 128)
    sn.fix_gate("layers.0.mlp", 2)  # same choice again: no-op
    with pytest.raises(GateError, match="already fixed"):
        sn.fix_gate("layers.0.mlp", 1)
    with pytest.raises(GateError, match="unknown gate"):
        sn.fix_gate("layers.0.ffn", 0)
    with pytest.raises(GateError, match="out of range"):
        sn.fix_gate("hidden", 5)
    sn.fix_gate("layers.1.wbits.gate_up", 2)
    assert sn.layers[1].mlp.up_proj.fixed_bits == 2 and sn.layers[1].mlp.gate_proj.fixed_bits == 2
    assert "layers.0.mlp" not in sn.open_gates() and "layers.0.mlp" in sn.fixed
    assert sn.entropy()["layers.0.mlp"] == 0.0
    probs = sn.probs()
    assert torch.equal(probs["layers.0.mlp"], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_entropy_is_normalised():
    net = build(tiny_model(layers=1), tiny_space())
    ent = net.entropy()
    assert ent["hidden"] == pytest.approx(1.0)
    with torch.no_grad():
        net.arch_parameters()[0].copy_(torch.tensor([30.0, 0.0, 0.0]))
    assert net.entropy()["hidden"] < 1e-6
    assert ent["layers.0.q_per_group"] == 0.0
    assert math.isclose(net.entropy()["layers.0.mlp"], 1.0, rel_tol=1e-6)


def test_state_dict_resumes_logits_and_fixed_gates(sn):
    sn.fix_gate("hidden", 1)
    sn.fix_gate("layers.1.kv_groups", 2)
    sn.fix_gate("layers.0.keep", 1)
    state = sn.state_dict()
    assert not any(k.endswith("_table") for k in state)  # masks are rebuilt, not stored
    fresh = build(tiny_model(layers=2), tiny_space())
    fresh.load_state_dict(state)
    assert fresh.fixed == sn.fixed
    assert all(torch.equal(a, b) for a, b in zip(fresh.arch_parameters(), sn.arch_parameters()))
    assert fresh.layers[0].skipped and fresh.layers[1].self_attn.kv_act == 1
    ids = token_ids(seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(ids), sn(ids))
    other = build(tiny_model(layers=3), tiny_space())
    with pytest.raises(Exception, match="another model|size mismatch|Missing|Unexpected"):
        other.load_state_dict(state)


def test_vectorised_forward_is_one_pass_whatever_the_number_of_candidates():
    sn = build(tiny_model(layers=1), tiny_space())
    ids = token_ids(rows=1, seq=8)
    probs = sn.sample_probs(1.0)
    with CountLinear() as count:
        sn(ids, probs)
    assert count.calls == 7 + 1  # one matmul per linear, every candidate mixed in
    sn.mode = "naive"
    with CountLinear() as naive, torch.no_grad():
        sn(ids, probs)
    # naive: per linear |abits| x |wbits| matmuls, per width branch
    assert naive.calls > 10 * count.calls


def test_mode_is_validated(sn):
    with pytest.raises(ValueError, match="vectorized"):
        sn.mode = "fast"


def test_set_arch_then_argmax_arch_round_trips(sn):
    arch = Arch.random(sn.space, 5)
    sn.set_arch(arch)
    assert not sn.open_gates()
    assert sn.argmax_arch().to_dict() == arch.to_dict()
    with pytest.raises(Exception, match="fixed it to"):
        sn.set_arch(Arch.full(sn.space) if arch.to_dict() != Arch.full(sn.space).to_dict() else Arch.random(sn.space, 6))


def test_checkpoint_carries_the_rope_pair_order(tmp_path):
    space = tiny_space(kv_groups=[1.0, 0.5], head_dim=[1.0, 0.5])
    model = tiny_model(layers=2)
    permuted = build(model, space, calib_ids=token_ids(rows=4, seq=32, seed=1), cache_dir=tmp_path)
    permuted.fix_gate("layers.0.head_dim", 1)
    plain = build(model, space)  # no calibration: original order
    assert plain.rope_perms[0] is None and permuted.rope_perms[0] is not None
    plain.load_state_dict(permuted.state_dict())
    ids = token_ids(seed=8)
    with torch.no_grad():
        full = plain.arch_probs(plain.argmax_arch())
        assert torch.equal(plain(ids, full), permuted(ids, full))
        assert (plain(ids, full) - materialize(permuted, permuted.argmax_arch())(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("backend_name", ["torch", "llamacpp"])
def test_output_mixing_equals_weight_mixing_with_gradients(backend_name):
    # few rows mix outputs (one matmul per bits choice), many rows mix weights: same value, same gradients
    from archquant.backends import get_backend
    from archquant.supernet.linear import ElasticLinear
    from archquant.supernet.quant import act_classes, mixed_act

    torch.manual_seed(0)
    backend = get_backend(backend_name)
    bits = [16, 8, 4]
    classes = act_classes(backend, [16], bits)
    weight = torch.nn.Parameter(torch.randn(48, 64), requires_grad=False)
    lin = ElasticLinear(weight, None, bits, 32, backend, classes)
    x0 = torch.randn(3, 5, 64)
    logits = torch.randn(3)

    def run(max_tokens):
        lin.mix_outputs_max_tokens = max_tokens
        x = x0.clone().requires_grad_(True)
        pi = logits.clone().requires_grad_(True)
        p = pi.softmax(-1)
        xs = mixed_act(x, backend, [16], None, 0, [bits[classes.index(c)] for c in sorted(set(classes))], sorted(set(classes)))
        y = lin(xs, p)
        (y * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
        return y.detach(), x.grad, pi.grad

    y_out, gx_out, gp_out = run(10**6)
    y_w, gx_w, gp_w = run(0)
    torch.testing.assert_close(y_out, y_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_out, gx_w, rtol=1e-4, atol=1e-5)
    # d pi is a sum of ~3k signed products computed in a different order (<dy, y_k> vs <dW, Q_k>):
    # fp32 cancellation allows ~1e-3 of its scale
    torch.testing.assert_close(gp_out, gp_w, rtol=0, atol=2e-3 * float(gp_w.abs().max()))
    assert gp_out.abs().sum() > 0


@pytest.mark.parametrize("bits", [[16, 8, 4], [8, 16, 4], [8, 4], [4, 8, 16]])
def test_weight_choices_mix_like_the_explicit_sum_and_keep_no_16_bit_copy(bits):
    from archquant.backends import get_backend
    from archquant.supernet.quant import QuantCache, backend_quantiser

    be = get_backend("torch")
    w = torch.nn.Parameter(torch.randn(48, 64))
    with torch.no_grad():
        choices = QuantCache().all(w, lambda: w[:32], bits, backend_quantiser(be, 32), 0)
    ref = [be.fake_quant_weight(w.detach()[:32], b, 32) for b in bits]
    for k in range(len(bits)):
        assert torch.equal(choices[k], ref[k])
    if 16 in bits:  # the 16-bit choice is a view of the Parameter, not a copy
        assert choices[bits.index(16)].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert choices.nbytes_owned(w) == (len(bits) - 1) * 32 * 64 * 4
    pi = torch.softmax(torch.randn(len(bits)), 0).requires_grad_(True)
    n = len(bits)
    for ks in [list(range(n)), list(range(1, n)), [0], list(range(0, n, 2))]:  # the last: not adjacent
        got = choices.mix(pi, ks)
        want = sum(pi[k] * ref[k] for k in ks)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        g_got, = torch.autograd.grad((got * want.detach()).sum(), pi)
        g_want, = torch.autograd.grad((want * want.detach()).sum(), pi)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
    sub = choices.take(lambda t, sel, dim: t if sel is None else t.narrow(dim, 0, sel), 16, None)
    assert torch.equal(sub[len(bits) - 1], ref[-1][:16])


def test_mixed_choices_pass_straight_through_gradients_to_trainable_weights():
    from archquant.backends import get_backend
    from archquant.supernet.quant import QuantCache, backend_quantiser

    be = get_backend("torch")
    w = torch.nn.Parameter(torch.randn(24, 64))
    pi = torch.softmax(torch.randn(3), 0).requires_grad_(True)
    target = torch.randn(24, 64)
    got = QuantCache().all(w, lambda: w, [16, 8, 4], backend_quantiser(be, 32), 0).mix(pi, [0, 1, 2])
    g_w, g_pi = torch.autograd.grad((got * target).sum(), (w, pi))
    want = sum(pi[k] * be.fake_quant_weight(w, b, 32) for k, b in enumerate([16, 8, 4]))
    r_w, r_pi = torch.autograd.grad((want * target).sum(), (w, pi))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-6, atol=1e-6)  # STE: sum_k pi_k * target
    torch.testing.assert_close(g_pi, r_pi, rtol=1e-5, atol=1e-5)
