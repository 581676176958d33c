"""Anchor-pool arithmetic against a per-token, per-anchor loop written from the documented formulas."""

import math

import pytest
import torch

from kvjudge.cache.anchors import Anchor, AnchorPool, correction

L, H, D = 3, 2, 4


def _anchor(gen, key, n, glue):
    r = lambda t: torch.randn(L, H, t, D, generator=gen)  # noqa: E731
    a = Anchor(key, 1, r(n), r(n), r(n), r(n))
    if glue:
        a.glue_dk, a.glue_dv = r(glue), r(glue)
    return a


def _softmax(xs):
    e = [math.exp(-x) for x in xs]
    return [v / sum(e) for v in e]


def _reference(pool, bk, bv, m, tau):
    """Literal transcription of the documented approximation, one scalar weight at a time."""
    n = bk.shape[2]
    use = [a for a in pool if a.length >= n]
    dk, dv = torch.zeros_like(bk), torch.zeros_like(bv)
    for t in range(n):  # distance over every layer (layer 0 included); layer 0 never corrected
        wk = _softmax([float((bk[:, :, t] - a.base_k[:, :, t]).abs().mean()) / tau for a in use])
        wv = _softmax([float((bv[:, :, t] - a.base_v[:, :, t]).abs().mean()) / tau for a in use])
        for a, ak, av in zip(use, wk, wv):
            dk[1:, :, t] += ak * a.dk[1:, :, t]
            dv[1:, :, t] += av * a.dv[1:, :, t]
    guse = [a for a in use if a.glue_dk is not None and a.glue_dk.shape[2] >= m]
    gdk, gdv = torch.zeros(L, H, m, D), torch.zeros(L, H, m, D)
    for layer in range(1, L):
        for h in range(H):
            for d in range(D):
                # the *segment's* distance to the anchor's segment (its last n tokens), not the glue's
                wk = _softmax([float(torch.linalg.vector_norm(bk[layer, h, :, d] - a.base_k[layer, h, a.length - n:, d]))
                               / tau for a in guse])
                wv = _softmax([float(torch.linalg.vector_norm(bv[layer, h, :, d] - a.base_v[layer, h, a.length - n:, d]))
                               / tau for a in guse])
                for a, ak, av in zip(guse, wk, wv):
                    gdk[layer, h, :, d] += ak * a.glue_dk[layer, h, :m, d]
                    gdv[layer, h, :, d] += av * a.glue_dv[layer, h, :m, d]
    return dk, dv, gdk, gdv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correction_matches_the_formula(dtype):
    gen = torch.Generator().manual_seed(0)
    tau = 4.0
    pool = AnchorPool(tau=tau)
    # lengths 7, 5 (too short for n=6: ignored), 9 without glue (used for tokens, not for the glue), 6
    for key, n, glue in (("a", 7, 3), ("b", 5, 3), ("c", 9, 0), ("d", 6, 4)):
        a = _anchor(gen, key, n, glue)
        for name in ("base_k", "base_v", "dk", "dv", "glue_dk", "glue_dv"):
            if getattr(a, name) is not None:
                setattr(a, name, getattr(a, name).to(dtype))
        pool.add(a)
    bk, bv = torch.randn(L, H, 6, D, generator=gen), torch.randn(L, H, 6, D, generator=gen)
    corr = pool.correction(bk, bv, 3)
    upcast = [Anchor(a.key, a.slot, *(getattr(a, f).float() for f in ("base_k", "base_v", "dk", "dv")),
                     *(None if getattr(a, f) is None else getattr(a, f).float() for f in ("glue_dk", "glue_dv")))
              for a in pool.anchors]
    ref = _reference(upcast, bk, bv, 3, tau)
    for got, want in zip((corr.dk, corr.dv, corr.glue_dk, corr.glue_dv), ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert corr.dk[0].abs().max() == 0 and corr.glue_dv[0].abs().max() == 0  # layer 0 never corrected
    assert corr.dk[1:].abs().max() > 0 and corr.glue_dk[1:].abs().max() > 0


def test_layer_zero_counts_in_the_token_distance():
    """Two anchors equal on layers 1.. : only layer 0 tells them apart, and it must."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(L, H, 4, D, generator=gen)
    near, far = base.clone(), base.clone()
    far[0] += 30.0
    a = Anchor("near", 0, near, near, torch.ones(L, H, 4, D), torch.ones(L, H, 4, D))
    b = Anchor("far", 0, far, far, -torch.ones(L, H, 4, D), -torch.ones(L, H, 4, D))
    corr = correction([a, b], base, base)
    assert corr.dk[1:].min() > 0.99  # nearly all weight on "near" (delta +1)


def test_glue_weights_follow_the_segment_not_the_glue():
    """The glue delta is weighted by the segment's distance to each anchor's segment: a glue whose own
    KV matches anchor B still takes anchor A's glue delta when the segment matches anchor A."""
    gen = torch.Generator().manual_seed(4)
    r = lambda t: torch.randn(L, H, t, D, generator=gen)  # noqa: E731
    seg_k, seg_v = r(5), r(5)
    glue_a, glue_b = r(2), r(2)  # what each anchor's glue looked like (not stored: the rule ignores it)
    a = Anchor("A", 1, seg_k.clone(), seg_v.clone(), r(5), r(5), glue_dk=torch.full((L, H, 2, D), 1.0),
               glue_dv=torch.full((L, H, 2, D), 1.0))
    b = Anchor("B", 2, seg_k + 10 * r(5), seg_v + 10 * r(5), r(5), r(5), glue_dk=torch.full((L, H, 2, D), -1.0),
               glue_dv=torch.full((L, H, 2, D), -1.0))
    new_glue = glue_b.clone()  # the new glue's KV is B's twin: a glue-KV rule would pick B
    assert torch.linalg.vector_norm(new_glue - glue_b) < torch.linalg.vector_norm(new_glue - glue_a)
    corr = correction([a, b], seg_k, seg_v, glue_len=2)
    assert corr.glue_dk[1:].min() > 0.99 and corr.glue_dv[1:].min() > 0.99  # A's glue delta (+1)


def test_no_usable_anchor_and_glue_without_anchors():
    gen = torch.Generator().manual_seed(1)
    pool = AnchorPool()
    pool.add(_anchor(gen, "short", 2, 0))
    assert pool.correction(torch.randn(L, H, 3, D), torch.randn(L, H, 3, D), None) is None
    corr = pool.correction(torch.randn(L, H, 2, D), torch.randn(L, H, 2, D), 1)
    assert corr is not None and corr.glue_dk is None  # the only anchor has no glue measurement


def test_eviction_runs_before_insert_and_the_pool_settles_at_max_plus_one():
    gen = torch.Generator().manual_seed(2)
    pool = AnchorPool(max_anchors=3, window=2)
    for k in "abcd":
        pool.add(_anchor(gen, k, 2, 0))
    assert [a.key for a in pool.anchors] == ["a", "b", "c", "d"]  # 4 = max + 1: nothing evicted yet
    pool.anchors[0].activations = 5  # "a" is the oldest but busy: "b" goes
    pool.add(_anchor(gen, "e", 2, 0))
    assert [a.key for a in pool.anchors] == ["a", "c", "d", "e"]
    fresh = _anchor(gen, "c", 2, 0)
    pool.anchors[1].activations = 2
    pool.add(fresh)  # same key: updated in place, no eviction, age and activations kept
    assert [a.key for a in pool.anchors] == ["a", "c", "d", "e"]
    assert pool.anchors[1].activations == 2 and torch.equal(pool.anchors[1].dk, fresh.dk)
    for k in "fgh":
        pool.add(_anchor(gen, k, 2, 0))
        assert len(pool.anchors) == 4


def _values(gen, n):
    return torch.randn(L, H, n, D, generator=gen)


def test_entropy_probe_uses_the_whole_candidate():
    """A candidate equal to anchor A on its first 32 tokens and different after is not A's twin: its
    distance to A equals its distance to B, so the entropy test asks for a new anchor."""
    gen = torch.Generator().manual_seed(5)
    n = 48
    v = _values(gen, n)
    noise = 3 * _values(gen, 16)
    va, vb = v.clone(), v.clone()
    va[:, :, 32:] += noise  # twin for 32 tokens, then different
    vb[:, :, :16] += noise  # as far from v as A is, over the whole candidate
    pool = AnchorPool()
    for key, val in (("A", va), ("B", vb)):
        pool.add(Anchor(key, 0, val, val, val, val))
    assert pool.needs_anchor(v)  # H = 1 bit > 0.3 * log2(2)
    assert [a.activations for a in pool.anchors] == [0, 0]
    # the 32-token probe would have called A a twin: distance 0 to A, large to B
    d32 = [float(torch.linalg.vector_norm(v[:, :, :32] - x[:, :, :32])) for x in (va, vb)]
    assert d32[0] == 0 and d32[1] > 10
    # a real twin over the whole length is reused, and activates A
    pool.add(Anchor("T", 0, v.clone(), v.clone(), v, v))
    assert not pool.needs_anchor(v)
    assert pool.get("T").activations == 1


def test_entropy_probe_needs_two_usable_anchors():
    gen = torch.Generator().manual_seed(6)
    v = _values(gen, 6)
    pool = AnchorPool()
    assert pool.needs_anchor(v)
    pool.add(Anchor("a", 0, v, v, v, v))
    assert pool.needs_anchor(v)  # one anchor, even an exact one
    pool.add(Anchor("short", 0, v[:, :, :3], v[:, :, :3], v[:, :, :3], v[:, :, :3]))
    assert pool.needs_anchor(v)  # two anchors, but one too short to be usable
    assert not AnchorPool(min_anchors=1, anchors=[Anchor("a", 0, v, v, v, v)]).needs_anchor(v)
