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


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to fp32 summation order: the supernet's channels are importance-permuted, so its sums run in
    another order than the reference's, and how much that moves a logit depends on the CPU's kernels (1.0e-4 on
    an AVX-512 Xeon, less on an AVX2 EPYC, logits up to ~20). 1e-5 of the largest logit is ~100 ulps of it; a
    wrong mask, cut or permutation moves logits by 1e-2 and more."""
    diff, tol = float((out - ref).abs().max()), 1e-5 * float(ref.abs().max())
    assert diff <= tol, (diff, tol)


@torch.no_grad()
def test_full_space_subnet_at_16_bits_equals_smollm2(smol):
    model, sn, ids = smol
    ref = model(ids).logits
    _close(sn(ids, sn.arch_probs(Arch.full(sn.space))), ref)
    _close(materialize(sn, Arch.full(sn.space))(ids).logits, ref)
    assert sn.space.hidden == [576, 512, 448, 384, 320] and sn.space.mlp == [1536, 1152, 768, 384]


@torch.no_grad()
def test_random_smollm2_subnets_equal_their_materialised_models(smol):
    _, sn, ids = smol
    rng = random.Random(0)
    for _ in range(3):
        arch = Arch.random(sn.space, rng)
        ref = sn(ids, sn.arch_probs(arch))
        _close(materialize(sn, arch)(ids).logits, ref)
