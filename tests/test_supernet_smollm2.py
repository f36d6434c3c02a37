"""Exactness on the embedded default (SmolLM2-135M, fp32): slow, run with ``-m slow``."""

from __future__ import annotations

import random

import pytest
import torch

from archquant.supernet import Arch, SpaceConfig, build, materialize

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
    "salt and wool. Over the centuries the market grew into a town with walls, a cathedral and a university, "
    "and its scholars wrote about astronomy, medicine and law. "
)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from archquant.models.registry import load_model

    model, tok = load_model("smollm2-135m")
    ids = tok(TEXT * 6, return_tensors="pt").input_ids[:, :128]
    calib = ids.reshape(2, 64)
    sn = build(model, SpaceConfig(), calib_ids=calib, cache_dir=tmp_path_factory.mktemp("cache"))
    return model, sn, ids[:, :48]


@torch.no_grad()
def test_full_space_subnet_at_16_bits_equals_smollm2(smol):
    model, sn, ids = smol
    ref = model(ids).logits
    assert (sn(ids, sn.arch_probs(Arch.full(sn.space))) - ref).abs().max() <= 1e-4
    assert (materialize(sn, Arch.full(sn.space))(ids).logits - ref).abs().max() <= 1e-4
    assert sn.space.hidden == [576, 512, 448, 384, 320] and sn.space.mlp == [1536, 1152, 768, 384]


@torch.no_grad()
def test_random_smollm2_subnets_equal_their_materialised_models(smol):
    _, sn, ids = smol
    rng = random.Random(0)
    for _ in range(3):
        arch = Arch.random(sn.space, rng)
        diff = (materialize(sn, arch)(ids).logits - sn(ids, sn.arch_probs(arch))).abs().max()
        assert diff <= 1e-4, (arch.summary(), float(diff))
