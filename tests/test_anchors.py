"""Anchor-pool arithmetic against a per-token, per-anchor loop written from the formulas."""

import math

import pytest
import torch

from kvjudge.cache.anchors import Anchor, AnchorPool

L, H, D = 3, 2, 4


def _anchor(gen, key, n, glue):
    r = lambda t: torch.randn(L, H, t, D, generator=gen)  # noqa: E731
    a = Anchor(key, 1, r(n), r(n), r(n), r(n))
    if glue:
        a.glue_k, a.glue_v, a.glue_dk, a.glue_dv = r(glue), r(glue), r(glue), r(glue)
    return a


def _reference(pool, bk, bv, gk, gv, tau):
    """Literal transcription of the documented approximation, one scalar weight at a time."""
    n, m = bk.shape[2], gk.shape[2]
    use = [a for a in pool if a.length >= n]
    dk, dv = torch.zeros_like(bk), torch.zeros_like(bv)
    for t in range(n):
        ek = [math.exp(-float((bk[1:, :, t] - a.base_k[1:, :, t]).abs().mean()) / tau) for a in use]
        ev = [math.exp(-float((bv[1:, :, t] - a.base_v[1:, :, t]).abs().mean()) / tau) for a in use]
        for a, wk, wv in zip(use, ek, ev):
            dk[1:, :, t] += wk / sum(ek) * a.dk[1:, :, t]
            dv[1:, :, t] += wv / sum(ev) * a.dv[1:, :, t]
    guse = [a for a in use if a.glue_k is not None and a.glue_k.shape[2] >= m]
    gdk, gdv = torch.zeros_like(gk), torch.zeros_like(gv)
    for layer in range(1, L):
        for h in range(H):
            for d in range(D):
                ek = [math.exp(-float(torch.linalg.vector_norm(gk[layer, h, :, d] - a.glue_k[layer, h, :m, d])) / tau)
                      for a in guse]
                ev = [math.exp(-float(torch.linalg.vector_norm(gv[layer, h, :, d] - a.glue_v[layer, h, :m, d])) / tau)
                      for a in guse]
                for a, wk, wv in zip(guse, ek, ev):
                    gdk[layer, h, :, d] += wk / sum(ek) * a.glue_dk[layer, h, :m, d]
                    gdv[layer, h, :, d] += wv / sum(ev) * a.glue_dv[layer, h, :m, d]
    return dk, dv, gdk, gdv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correction_matches_the_formula(dtype):
    gen = torch.Generator().manual_seed(0)
    tau = 4.0
    pool = AnchorPool(tau=tau)
    # lengths 7, 5 (too short for n=6: ignored), 9 without glue (used for tokens, not for the glue)
    for key, n, glue in (("a", 7, 3), ("b", 5, 3), ("c", 9, 0), ("d", 6, 4)):
        a = _anchor(gen, key, n, glue)
        for name in ("base_k", "base_v", "dk", "dv", "glue_k", "glue_v", "glue_dk", "glue_dv"):
            if getattr(a, name) is not None:
                setattr(a, name, getattr(a, name).to(dtype))
        pool.add(a)
    bk, bv = torch.randn(L, H, 6, D, generator=gen), torch.randn(L, H, 6, D, generator=gen)
    gk, gv = torch.randn(L, H, 3, D, generator=gen), torch.randn(L, H, 3, D, generator=gen)
    corr = pool.correction(bk, bv, gk, gv)
    upcast = [Anchor(a.key, a.slot, *(getattr(a, f).float() for f in ("base_k", "base_v", "dk", "dv")),
                     *(None if getattr(a, f) is None else getattr(a, f).float()
                       for f in ("glue_k", "glue_v", "glue_dk", "glue_dv"))) for a in pool.anchors]
    ref = _reference(upcast, bk, bv, gk, gv, tau)
    for got, want in zip((corr.dk, corr.dv, corr.glue_dk, corr.glue_dv), ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert corr.dk[0].abs().max() == 0 and corr.glue_dv[0].abs().max() == 0  # layer 0 never corrected
    assert corr.dk[1:].abs().max() > 0 and corr.glue_dk[1:].abs().max() > 0


def test_no_usable_anchor_and_glue_without_anchors():
    gen = torch.Generator().manual_seed(1)
    pool = AnchorPool()
    pool.add(_anchor(gen, "short", 2, 0))
    assert pool.correction(torch.randn(L, H, 3, D), torch.randn(L, H, 3, D), None, None) is None
    corr = pool.correction(torch.randn(L, H, 2, D), torch.randn(L, H, 2, D), torch.randn(L, H, 1, D),
                           torch.randn(L, H, 1, D))
    assert corr is not None and corr.glue_dk is None  # the only anchor has no glue measurement


def test_eviction_drops_least_activated_of_the_oldest():
    gen = torch.Generator().manual_seed(2)
    pool = AnchorPool(max_anchors=3, window=2)
    for k in "abc":
        pool.add(_anchor(gen, k, 2, 0))
    pool.anchors[0].activations = 5  # "a" is the oldest but busy: "b" goes
    pool.add(_anchor(gen, "d", 2, 0))
    assert [a.key for a in pool.anchors] == ["a", "c", "d"]
    pool.add(_anchor(gen, "c", 2, 0))  # same key replaces, no eviction
    assert [a.key for a in pool.anchors] == ["a", "d", "c"]
