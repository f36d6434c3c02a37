"""Expected latency/memory against brute-force enumeration, gradients, interpolation, table I/O and lookup rules."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from archquant.backends import BackendError, get_backend
from archquant.core.arch import Arch
from archquant.core.space import SpaceConfig, resolve_space
from archquant.latency import LatencyModel, LatencyTable, TableError, TableMismatchWarning, load_table_for
from archquant.latency.config import LatencyConfig
from archquant.latency.roofline import RooflineParams, save_roofline
from archquant.latency.scenario import Scenario
from archquant.latency.signatures import enumerate_signatures
from archquant.latency.table import TABLE_VERSION
from archquant.models.tiny import tiny_llama, tiny_llama_config
from archquant.utils.env import device_name, versions

TINY = dict(width_multiple=32, group_size=32)


def small_space(**kw):
    """A tiny space small enough to enumerate every subnet (2 blocks, 2 choices per gate)."""
    cfg = dict(hidden=[1.0, 0.5], kv_groups=[1.0, 0.25], mlp=[1.0, 0.5], wbits=[16, 4], abits=[16, 8],
               lm_head_bits=[16, 4], bits_granularity="layer", **TINY)
    cfg.update(kw)
    return resolve_space(SpaceConfig(**cfg), tiny_llama_config())


def random_table(space, seed=0, scenario=Scenario("decode"), **header) -> LatencyTable:
    """A synthetic table: an independent random ms for every signature the space can produce."""
    rng = random.Random(seed)
    ops = {kind: [{**s, "ms": rng.uniform(0.01, 1.0)} for s in sigs] for kind, sigs in enumerate_signatures(space).items()}
    h = {"device": device_name("cpu"), "backend": "torch", **scenario.header(), "model": dict(space.fingerprint),
         "versions": versions(), "date": "2026-01-01", "method": "synthetic", **header}
    return LatencyTable(header=h, ops=ops)


def reference_ms(table: LatencyTable, space, choice: dict) -> float:
    """The contract's formula written out by hand for one combination of gate values (all-skip allowed)."""
    fp = space.fingerprint
    d, vocab = choice["hidden"], fp["vocab_size"]
    total = table.lookup("embedding", {"d": d}) + table.lookup("norm", {"d": d})
    total += table.lookup("lm_head", {"K": d, "N": vocab, "wbits": choice["lm_head.wbits"], "abits": 16})
    total += table.lookup("overhead", {"name": "per_token"})
    for l in range(space.num_layers):
        g = lambda k: choice[f"layers.{l}.{k}"]  # noqa: E731
        if not g("keep"):
            continue
        bits = {lin: g(f"wbits.{grp}") for grp, lins in space.bit_groups.items() for lin in lins}
        heads, kv, hd, m, a = g("kv_groups") * g("q_per_group"), g("kv_groups"), g("head_dim"), g("mlp"), g("abits")
        lin = lambda k, n, b: table.lookup("linear", {"K": k, "N": n, "wbits": b, "abits": a})  # noqa: E731
        total += 2 * table.lookup("norm", {"d": d})
        total += lin(d, heads * hd, bits["q"]) + lin(d, kv * hd, bits["k"]) + lin(d, kv * hd, bits["v"])
        total += table.lookup("attention", {"heads": heads, "kv_heads": kv, "head_dim": hd})
        total += lin(heads * hd, d, bits["o"]) + lin(d, m, bits["gate"]) + lin(d, m, bits["up"]) + lin(m, d, bits["down"])
        total += table.lookup("act", {"d": m}) + table.lookup("overhead", {"name": "per_layer"})
    return total


def random_probs(space, seed=0, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, opts in space.gates().items():
        logits = torch.randn(len(opts), generator=gen, dtype=dtype)
        out[name] = torch.softmax(logits, 0).requires_grad_(requires_grad)
    return out


def test_expectation_matches_brute_force_enumeration():
    space = small_space()
    table = random_table(space)
    table.ops["overhead"] = [{"name": "per_layer", "ms": 0.3}, {"name": "per_token", "ms": 1.7}]
    table = LatencyTable.from_dict(table.to_dict())
    lm = LatencyModel(space, table, "torch")
    probs = random_probs(space)
    gates = space.gates()
    names = list(gates)
    expected = 0.0
    for combo in itertools.product(*(range(len(gates[n])) for n in names)):
        p = math.prod(float(probs[n][i]) for n, i in zip(names, combo))
        expected += p * reference_ms(table, space, {n: gates[n][i] for n, i in zip(names, combo)})
    assert len(list(itertools.product(*gates.values()))) == 4096  # the enumeration is really exhaustive
    assert float(lm.expected_ms(probs)) == pytest.approx(expected, abs=1e-6)


def test_fused_bits_one_block_brute_force():
    space = resolve_space(SpaceConfig(hidden=[1.0, 0.75], kv_groups=[1.0, 0.5], mlp=[1.0, 0.25], wbits=[16, 8],
                                      abits=[16, 8], lm_head_bits=[8, 4], bits_granularity="fused", **TINY),
                          tiny_llama_config(num_hidden_layers=1))
    table = random_table(space, seed=3)
    lm = LatencyModel(space, table, "torch")
    probs = random_probs(space, seed=5)
    gates = space.gates()
    names = list(gates)
    expected = sum(
        math.prod(float(probs[n][i]) for n, i in zip(names, combo))
        * reference_ms(table, space, {n: gates[n][i] for n, i in zip(names, combo)})
        for combo in itertools.product(*(range(len(gates[n])) for n in names))
    )
    assert float(lm.expected_ms(probs)) == pytest.approx(expected, abs=1e-6)


def test_predict_is_sum_of_ops_and_correction_applies():
    space = resolve_space(SpaceConfig(**TINY), tiny_llama_config(num_hidden_layers=3))
    table = random_table(space, seed=1)
    table.correction = {"scale": 1.25, "offset_ms": -0.5}
    lm = LatencyModel(space, table, "torch")
    for seed in range(5):
        arch = Arch.random(space, seed)
        choice = arch.to_choices(space)
        raw = reference_ms(table, space, choice)
        assert lm.sum_of_ops_ms(arch) == pytest.approx(raw, abs=1e-9)
        assert lm.predict_ms(arch, corrected=False) == pytest.approx(raw, abs=1e-9)
        assert lm.predict_ms(arch) == pytest.approx(1.25 * raw - 0.5, abs=1e-9)


def test_gradients_flow_to_probabilities():
    space = resolve_space(SpaceConfig(**TINY), tiny_llama_config())
    lm = LatencyModel(space, random_table(space), "torch")
    logits = {n: torch.randn(len(o), dtype=torch.float64, requires_grad=True) for n, o in space.searchable().items()}
    e = lm.expected_ms({n: torch.softmax(a, 0) for n, a in logits.items()}) + lm.expected_mb(
        {n: torch.softmax(a, 0) for n, a in logits.items()})
    e.backward()
    for n, a in logits.items():
        assert a.grad is not None and torch.isfinite(a.grad).all(), n
    # every searchable gate changes latency in this table, so its gradient is non-zero
    assert all(a.grad.abs().sum() > 0 for n, a in logits.items()), [n for n, a in logits.items() if a.grad.abs().sum() == 0]

    small = small_space()
    lm2 = LatencyModel(small, random_table(small), "torch")
    names = list(small.searchable())
    flat = torch.randn(sum(len(small.gates()[n]) for n in names), dtype=torch.float64, requires_grad=True)

    def fn(x):
        probs, i = {}, 0
        for n in names:
            k = len(small.gates()[n])
            probs[n] = torch.softmax(x[i:i + k], 0)
            i += k
        return lm2.expected_ms(probs)

    assert torch.autograd.gradcheck(fn, (flat,))


def test_float32_probs_and_missing_gate_message():
    space = small_space()
    lm = LatencyModel(space, random_table(space), "torch")
    p64 = random_probs(space)
    p32 = {k: v.float() for k, v in p64.items()}
    assert float(lm.expected_ms(p32)) == pytest.approx(float(lm.expected_ms(p64)), rel=1e-5)
    del p64["layers.1.mlp"]
    with pytest.raises(KeyError, match="layers.1.mlp"):
        lm.expected_ms(p64)


def reference_mb(space, choice: dict, backend) -> float:
    """Weight bytes of one combination by hand: params x bits/8 + scales (embedding and norms at 16 bits)."""
    fp, g = space.fingerprint, space.group_size
    d = choice["hidden"]
    nb = lambda n, b: backend.weight_bytes(n, b, g)  # noqa: E731
    lm_bits = choice["lm_head.wbits"]
    head = 0 if lm_bits == 16 and fp["tie_word_embeddings"] else nb(d * fp["vocab_size"], lm_bits)
    total = nb(d * fp["vocab_size"], 16) + nb(d, 16) + head
    for l in range(space.num_layers):
        g_ = lambda k: choice[f"layers.{l}.{k}"]  # noqa: E731
        if g_("keep"):
            b = g_("wbits.all")
            heads, kv, hd, m = g_("kv_groups") * g_("q_per_group"), g_("kv_groups"), g_("head_dim"), g_("mlp")
            total += 2 * nb(d, 16) + nb(d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * m, b)
    return total / 1e6


def test_range_is_min_and_max_over_all_subnets():
    space = small_space()
    table = random_table(space, seed=7)
    lm = LatencyModel(space, table, "torch")
    names = list(space.gates())
    combos = [dict(zip(names, c)) for c in itertools.product(*space.gates().values())]
    combos = [c for c in combos if any(c[n] for n in names if n.endswith(".keep"))]  # a subnet keeps a block
    lat = [reference_ms(table, space, c) for c in combos]
    assert lm.range_ms(corrected=False) == pytest.approx((min(lat), max(lat)), abs=1e-9)
    mem = [reference_mb(space, c, lm.backend) for c in combos]
    assert lm.range_mb() == pytest.approx((min(mem), max(mem)), abs=1e-12)
    for c in combos[::97]:  # and the one-subnet predictions agree with the hand formulas
        arch = Arch.from_choices(space, c)
        assert lm.predict_ms(arch) == pytest.approx(reference_ms(table, space, c), abs=1e-9)
        assert lm.predict_mb(arch) == pytest.approx(reference_mb(space, c, lm.backend), abs=1e-12)


def test_memory_matches_materialised_parameter_count():
    """A full-width 16-bit subnet weighs 2 bytes per parameter of the HF model (tied lm_head costs nothing)."""
    cfg = tiny_llama_config(num_hidden_layers=3)
    space = resolve_space(SpaceConfig(**TINY), cfg)
    lm = LatencyModel(space, random_table(space), "torch")
    model = tiny_llama(vocab_size=cfg.vocab_size, num_hidden_layers=3)
    n_params = sum(p.numel() for p in model.parameters())
    assert lm.predict_mb(Arch.full(space)) == pytest.approx(2 * n_params / 1e6, rel=0, abs=1e-12)

    # all linears at 4 bits, lm_head at 8 (untied): packed ints + one fp16 scale and uint8 zero per group of 32
    arch = Arch.full(space)
    arch.lm_head_bits = 8
    for la in arch.layers:
        la.wbits = {k: 4 for k in la.wbits}
    lin = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    other = n_params - lin  # embedding + norms at 16 bits
    d, v = cfg.hidden_size, cfg.vocab_size
    want = 2 * other + lin * (0.5 + 3 / 32) + d * v * (1 + 3 / 32)
    assert lm.predict_mb(arch) == pytest.approx(want / 1e6, abs=1e-12)


# ---- interpolation -------------------------------------------------------------------------------
def _bilinear_table(ks, ns, f, ragged=()):
    rows = [{"K": k, "N": n, "wbits": 4, "abits": 16, "ms": f(k, n)} for k in ks for n in ns if (k, n) not in ragged]
    ops = {"linear": rows, "attention": [{"heads": 2, "kv_heads": 1, "head_dim": 16, "ms": 1.0}],
           "norm": [{"d": 64, "ms": 1.0}, {"d": 128, "ms": 3.0}], "embedding": [{"d": 64, "ms": 1.0}],
           "lm_head": [{"K": 64, "N": 256, "wbits": 16, "abits": 16, "ms": 1.0}]}
    return LatencyTable(header={"device": "x", "backend": "torch", "scenario": "decode", "batch": 1}, ops=ops)


def test_interpolation_exact_on_grid_and_bilinear_between():
    f = lambda k, n: 0.1 + 2e-3 * k + 3e-3 * n + 1e-5 * k * n  # noqa: E731  (bilinear: interpolation is exact)
    t = _bilinear_table([64, 128, 256], [64, 192, 576], f)
    for k, n in itertools.product([64, 128, 256], [64, 192, 576]):
        assert t.lookup("linear", {"K": k, "N": n, "wbits": 4, "abits": 16}) == f(k, n)
    for k, n in [(96, 100), (200, 500), (64, 128), (160, 576)]:
        assert t.lookup("linear", {"K": k, "N": n, "wbits": 4, "abits": 16}) == pytest.approx(f(k, n), rel=1e-12)
    # linear between grid points along one axis: the midpoint is the mean
    g = lambda k, n: float(k * k + n)  # noqa: E731
    t2 = _bilinear_table([64, 128], [64, 192], g)
    mid = t2.lookup("linear", {"K": 96, "N": 64, "wbits": 4, "abits": 16})
    assert mid == pytest.approx((g(64, 64) + g(128, 64)) / 2)
    assert t2.lookup("norm", {"d": 96}) == pytest.approx(2.0)


def test_interpolation_on_ragged_grid_and_missing_entry_message():
    f = lambda k, n: 1.0 + k + 10 * n  # noqa: E731
    t = _bilinear_table([64, 128, 256], [64, 192, 576], f, ragged={(128, 64), (128, 576)})
    # row K=128 cannot bracket N=100, so the rows K=64 and K=256 are used (still exact for a bilinear f)
    assert t.lookup("linear", {"K": 128, "N": 100, "wbits": 4, "abits": 16}) == pytest.approx(f(128, 100))
    with pytest.raises(TableError, match="'K': 512"):
        t.lookup("linear", {"K": 512, "N": 64, "wbits": 4, "abits": 16})
    with pytest.raises(TableError, match="'wbits': 8"):
        t.lookup("linear", {"K": 64, "N": 64, "wbits": 8, "abits": 16})
    # optional kinds cost 0 when a table leaves them out
    assert t.lookup("act", {"d": 256}) == 0.0 and t.lookup("overhead", {"name": "per_layer"}) == 0.0


# ---- table file and loader -----------------------------------------------------------------------
def test_table_roundtrip_and_version(tmp_path):
    space = small_space()
    table = random_table(space)
    path = tmp_path / "t.json"
    table.save(path)
    again = LatencyTable.load(path)
    assert again.ops == table.ops and again.header["method"] == "synthetic"
    d = json.loads(path.read_text())
    d["version"] = TABLE_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(TableError, match="version"):
        LatencyTable.load(path)
    with pytest.raises(FileNotFoundError, match="archquant-profile"):
        LatencyTable.load(tmp_path / "missing.json")


def test_unsupported_bits_and_wrong_backend_or_model():
    space = resolve_space(SpaceConfig(wbits=[16, 3], **TINY), tiny_llama_config())
    with pytest.raises(BackendError, match=r"weight bits \[3\]"):
        LatencyModel(space, random_table(space, backend="triton"), get_backend("triton"))
    small = small_space()
    with pytest.raises(TableError, match="backend 'triton'"):
        LatencyModel(small, random_table(small, backend="triton"), "torch")
    other = resolve_space(SpaceConfig(**TINY), tiny_llama_config(num_hidden_layers=3))
    with pytest.raises(TableError, match="num_hidden_layers"):
        LatencyModel(small, random_table(other), "torch")


@pytest.fixture
def tables_root(tmp_path, monkeypatch):
    root = tmp_path / "tables"
    monkeypatch.setenv("ARCHQUANT_LATENCY_TABLES", str(root))
    monkeypatch.setenv("ARCHQUANT_CACHE", str(tmp_path / "cache"))
    return root


def test_loader_finds_committed_table_by_header(tables_root):
    space = small_space()
    random_table(space).save(tables_root / device_name("cpu") / "tiny-torch-decode.json")
    random_table(space, scenario=Scenario("prefill")).save(tables_root / device_name("cpu") / "tiny-torch-prefill.json")
    lm = load_table_for(LatencyConfig(backend="torch", scenario="prefill"), space)
    assert lm.table.header["scenario"] == "prefill" and not lm.table.is_estimate


def test_loader_warns_or_refuses_foreign_tables(tables_root, tmp_path):
    space = small_space()
    path = tmp_path / "foreign.json"
    random_table(space, device="some-gpu").save(path)
    with pytest.warns(TableMismatchWarning, match="some-gpu"):
        lm = load_table_for(LatencyConfig(backend="torch", table=str(path)), space)
    assert lm.table.header["device"] == "some-gpu"
    with pytest.raises(TableError, match="strict"):
        load_table_for(LatencyConfig(backend="torch", table=str(path), strict=True), space)
    old = {**versions(), "torch": "1.0.0"}
    random_table(space, versions=old).save(path)
    with pytest.raises(TableError, match="torch 1.0.0"):
        load_table_for(LatencyConfig(backend="torch", table=str(path), strict=True), space)
    random_table(space).save(path)
    with pytest.raises(TableError, match="context"):
        load_table_for(LatencyConfig(backend="torch", table=str(path), strict=True, context=1024), space)


def test_loader_falls_back_to_labelled_roofline(tables_root):
    space = small_space()
    save_roofline(tables_root / device_name("cpu") / "roofline.json", RooflineParams(20.0, 100.0, 0.005))
    with pytest.warns(TableMismatchWarning, match="ROOFLINE ESTIMATE"):
        lm = load_table_for(LatencyConfig(backend="torch"), space)
    assert lm.table.is_estimate and "ROOFLINE" in lm.describe()
    # a roofline: halving weight bits at decode (memory bound) makes every large linear faster
    full = Arch.full(space)
    q4 = Arch.full(space)
    for la in q4.layers:
        la.wbits = {k: 4 for k in la.wbits}
    assert lm.predict_ms(q4) < lm.predict_ms(full)
