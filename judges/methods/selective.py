"""Selective reuse: run a cheap path, score its confidence, keep its answer when the confidence is at
least lambda, else answer with dense (``gate`` = ``accepted`` / ``fallback``).

Options:

* ``cheap``: the cheap path, any registered reuse method with options: ``NAME`` or
  ``NAME:key=value,...``; a bare value is the method's shorthand option (:data:`~kvjudge.judges.catalog.
  CHEAP_SHORTHAND`, e.g. ``partial:16`` = ``partial:recompute_first=16``). Dense and gates are refused.
* ``score``: ``margin`` -- the top-two gap of the cheap path's label log-probs (debiased when the case
  carries a slot prior; free: read from the suffix logits); ``risk`` -- P(cheap agrees with dense) from
  a logistic model over :data:`FEATURES`, computed without dense (:func:`call_features`).
* ``gate``: the calibration (``kvjudge calibrate-gate``): a gate.json path, or lambda itself (a number,
  then ``score`` must be ``margin``), or (Python callers) the gate's dict. Without a gate nothing is
  accepted: the method answers as dense (``decision["lambda"] = inf``).

A gate file is valid only for what it was fitted for (model id, candidate-KV mode, output mode, slot
prior, cheap path, score); any other use is a one-line :class:`~kvjudge.judges.prompt.JudgeInputError`.
Only ``label`` output is gated: a generated answer has no label log-probs, so ``generate`` output is
refused in one line (an answer-token probability would need the engine's decoder to return it).

Cost: the cheap path; ``risk`` adds a probe that runs the whole prompt through layers 0-1 only and stops
before layer 1's attention (``decision["probe_tokens"]`` tokens through ``probe_layers`` of the model's
layers, not counted in the runner's prefilled tokens); a fallback adds one dense prefill.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvjudge.cache.probe import attention_modules, fresh_keys
from kvjudge.cache.segments import CompressedSegment
from kvjudge.judges import methods as registry  # the registry package (attribute read at call time)
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.catalog import CHEAP_SHORTHAND, GATE_METHODS, method_options, option_value
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.prompt import JudgeInputError

SCORES = ("margin", "risk")
GATE_VERSION = 1
FEATURES = ("margin", "entropy", "winner_slot", "winner_is_last", "dev_winner", "dev_max", "dev_mean",
            "len_winner", "len_cv", "sim_top2", "sim_mean")
PROBE_LAYER = 1  # the layer whose keys are compared (CacheBlend's check layer)
IDENTITY = ("model_id", "candidate_kv", "output", "prior", "cheap", "score")


# ---------------------------------------------------------------------------- the cheap path's name
def parse_cheap(spec: str) -> tuple[str, dict]:
    """``"partial:16"`` / ``"partial:recompute_first=16,blend=0.1"`` / ``"naive"`` -> ``(name, options)``
    (one-line :class:`JudgeInputError` for unknown names, options, dense or gate methods)."""
    name, _, rest = str(spec).partition(":")
    name = name.strip()
    if name == "dense" or name in GATE_METHODS or name == "selective":
        raise JudgeInputError(f"selective: cheap path {name!r} is not a reuse method (give e.g. naive)")
    if name not in registry.METHODS:
        raise JudgeInputError(f"selective: unknown cheap path {name!r}; known: "
                              f"{', '.join(m for m in registry.known_methods() if m not in (*GATE_METHODS, 'dense'))}")
    opts: dict = {}
    for part in (p.strip() for p in rest.split(",") if p.strip()):
        key, eq, val = part.partition("=")
        if not eq:
            if name not in CHEAP_SHORTHAND:
                raise JudgeInputError(f"selective: cheap path {name!r} takes no bare value ({part!r}); write key=value")
            key, val = CHEAP_SHORTHAND[name], part
        key = key.strip()
        if key not in method_options(name):
            known = ", ".join(method_options(name)) or "none"
            raise JudgeInputError(f"selective: unknown option {key!r} for cheap path {name!r}; known: {known}")
        opts[key] = option_value(val.strip())
    return name, opts


def canonical_cheap(spec: str) -> str:
    """One spelling per cheap path: ``name`` or ``name:k=v,...`` (keys sorted)."""
    name, opts = parse_cheap(spec)
    return name if not opts else name + ":" + ",".join(f"{k}={opts[k]}" for k in sorted(opts))


# ---------------------------------------------------------------------------- the gate file
def read_gate(path: str | Path) -> dict:
    """A gate file's dict (one-line errors for unreadable or malformed files)."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JudgeInputError(f"cannot read gate file {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != GATE_VERSION or "fitted_for" not in data:
        raise JudgeInputError(f"{path} is not a kvjudge gate file (version {GATE_VERSION}; made by kvjudge calibrate-gate)")
    return data


def gate_lambda(gate: dict) -> float:
    """The gate's lambda (``null`` in the file: nothing passed, never accept)."""
    lam = gate.get("lambda")
    return math.inf if lam is None else float(lam)


def prior_identity(case: JudgeCase, methods: list[str]) -> str:
    """``none``, or ``<debias>:<12 hex>`` hashing the slot priors of ``methods`` in ``case`` (the scores a
    gate reads change with them)."""
    debias = getattr(case, "debias", "none") or "none"
    if debias == "none":
        return "none"
    priors = getattr(case, "priors", None) or {}
    table = {m: [round(float(x), 6) for x in priors[m]] for m in sorted(methods) if m in priors}
    return f"{debias}:{hashlib.sha256(json.dumps(table).encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- what the reuse side knows
def _jaccard(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


@torch.inference_mode()
def key_deviation(engine: JudgeEngine, case: JudgeCase) -> tuple[list[float | None], str | None]:
    """Per slot: mean over the candidate's tokens of ``sum_{h,d} (k_judge - k_reused)^2`` at layer
    :data:`PROBE_LAYER` (post-RoPE keys, all KV heads), relative to the mean ``sum k_judge^2``.
    ``k_judge`` comes from a prefill of the whole prompt that stops before that layer's attention.
    Returns ``(deviations [N], why unavailable or None)``; a token-compressed candidate gets ``None``."""
    model = engine.runner.model
    if len(attention_modules(model)) <= PROBE_LAYER:
        return [None] * case.prompt.n, f"the model has no layer {PROBE_LAYER}"
    real = fresh_keys(model, case.prompt.ids(), PROBE_LAYER)  # [H_kv, T, D]
    devs: list[float | None] = [None] * case.prompt.n
    for kind, slot, seg in engine.pieces(case):
        if kind != "candidate" or isinstance(seg, CompressedSegment) or seg.length == 0:
            continue
        fresh = real[:, seg.start:seg.start + seg.length]  # [H_kv, n, D]
        diff = (fresh - seg.keys[PROBE_LAYER].float().to(fresh.device)).pow(2).sum(dim=(0, 2))  # [n]
        ref = fresh.pow(2).sum(dim=(0, 2)).mean().clamp_min(1e-12)
        devs[slot] = float(diff.mean() / ref)
    why = None if any(d is not None for d in devs) else "every candidate's KV is token-compressed"
    return devs, why


def margin_of(scores: torch.Tensor) -> float:
    """The top-two gap of label scores ``[N]`` (``inf`` for one candidate)."""
    if scores.numel() < 2:
        return math.inf
    top = torch.topk(scores.float(), 2).values
    return float(top[0] - top[1])


def call_features(engine: JudgeEngine, case: JudgeCase, scores: torch.Tensor, probe: bool = True) -> dict:
    """The risk features of one call (:data:`FEATURES`) from the cheap path's label scores ``[N]`` and what
    the reuse side holds (no dense): margin, entropy of the label softmax, winner slot, layer-1 key
    deviation (``probe``), candidate lengths and token-set similarity. Also ``key_deviation``: ``"ok"`` or
    why it is missing (then its features are 0), and ``probe_tokens``."""
    s = scores.float()
    n = s.numel()
    top = torch.topk(s, min(2, n))
    margin = margin_of(s)
    p = torch.softmax(s, 0)
    entropy = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
    win = int(top.indices[0])
    second = int(top.indices[1]) if n > 1 else win
    cands = [tuple(c) for c in case.prompt.candidates]
    lens = torch.tensor([len(c) for c in cands], dtype=torch.float32)
    devs, why = key_deviation(engine, case) if probe else ([None] * n, "not probed (score margin)")
    have = [d for d in devs if d is not None]
    pairs = [_jaccard(cands[i], cands[j]) for i in range(n) for j in range(i + 1, n)]
    feats = {
        "margin": min(margin, 1e6), "entropy": entropy,
        "winner_slot": win / (n - 1) if n > 1 else 0.0, "winner_is_last": float(win == n - 1),
        "dev_winner": devs[win] if devs[win] is not None else 0.0,
        "dev_max": max(have) if have else 0.0, "dev_mean": sum(have) / len(have) if have else 0.0,
        "len_winner": float(lens[win] / lens.mean().clamp_min(1)),
        "len_cv": float(lens.std(unbiased=False) / lens.mean().clamp_min(1)),
        "sim_top2": _jaccard(cands[win], cands[second]), "sim_mean": sum(pairs) / len(pairs) if pairs else 1.0,
    }
    return {**feats, "key_deviation": why or "ok", "probe_tokens": len(case.prompt.ids()) if probe else 0}


def risk_confidence(model: dict, feats: dict) -> float:
    """P(cheap agrees with dense) of a fitted logistic model (``gates.fit_risk``'s dict): one dot product."""
    z = [(feats[f] - m) / sc for f, m, sc in zip(model["features"], model["mean"], model["scale"])]
    t = model["intercept"] + sum(w * x for w, x in zip(model["coef"], z))
    return 1.0 / (1.0 + math.exp(-t)) if t > -700 else 0.0


# ---------------------------------------------------------------------------- the method
@dataclass
class Selective:
    cheap: str | None = None
    score: str | None = None
    gate: object = None  # a gate.json path, lambda as a number, or the gate's dict
    _gate: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        g = self.gate
        if isinstance(g, str):
            try:
                g = float(g)  # "0.3", "inf", "-inf": lambda given directly
            except ValueError:
                g = read_gate(g)
        if isinstance(g, bool):
            raise TypeError(f"gate must be a gate file or a number, not {g!r}")
        if isinstance(g, dict):
            self._gate = g
            fitted = g.get("fitted_for") or {}
            for opt in ("cheap", "score"):
                mine, theirs = getattr(self, opt), fitted.get(opt)
                if mine is not None and theirs is not None and _norm(opt, mine) != _norm(opt, theirs):
                    raise JudgeInputError(f"selective: the gate was fitted for {opt} {theirs!r}, not {mine!r}")
                if mine is None:
                    setattr(self, opt, theirs)
            self.lam = gate_lambda(g)
        elif g is None:
            self.lam = math.inf
        elif isinstance(g, (int, float)):
            self.lam = float(g)
        else:
            raise TypeError(f"gate must be a gate file or a number, not {g!r}")
        self.cheap = canonical_cheap(self.cheap or "naive")
        self.score = self.score or "margin"
        if self.score not in SCORES:
            raise TypeError(f"score must be one of {', '.join(SCORES)}, not {self.score!r}")
        self._risk = (self._gate or {}).get("risk")
        if self.score == "risk" and self._risk is None and self.lam != -math.inf:
            raise JudgeInputError("selective: score risk needs a gate file with a fitted risk model (kvjudge calibrate-gate --score risk)")
        name, opts = parse_cheap(self.cheap)
        self._cheap = registry.make_method(name, **opts)  # an attribute: debias.needed_methods finds it

    def fitted_identity(self, engine: JudgeEngine, case: JudgeCase) -> dict:
        """What a gate fitted on this call would be fitted for (the gate file's ``fitted_for``)."""
        from kvjudge.judges.debias import needed_methods

        return {"model_id": engine.runner.model_id, "candidate_kv": case.candidate_kv, "output": case.output,
                "prior": prior_identity(case, needed_methods(type(self).name, self)), "cheap": self.cheap,
                "score": self.score}

    def _check(self, engine: JudgeEngine, case: JudgeCase) -> None:
        if case.output != "label":
            raise JudgeInputError("selective gates label output only: a generated answer has no label log-probs "
                                  "to score (use --judge-output label)")
        fitted = (self._gate or {}).get("fitted_for")
        if not fitted:
            return
        here = self.fitted_identity(engine, case)
        for key in IDENTITY:
            if key in fitted and fitted[key] != here[key]:
                raise JudgeInputError(f"the gate was fitted for {key.replace('_', ' ')} {fitted[key]!r}, this judge "
                                      f"runs {here[key]!r}: fit one for it with kvjudge calibrate-gate")

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        self._check(engine, case)
        out = self._cheap(engine, case)
        decision: dict = {"score": self.score, "lambda": self.lam, "cheap": self.cheap, "cheap_winner": out.winner,
                          "measured": bool((out.decision or {}).get("measured"))}
        if self.score == "risk":
            feats = call_features(engine, case, out.scores)
            conf = risk_confidence(self._risk, feats) if self._risk else None
            decision.update(features={f: feats[f] for f in FEATURES}, key_deviation=feats["key_deviation"],
                            probe_tokens=feats["probe_tokens"], probe_layers=PROBE_LAYER + 1)
        else:
            conf = margin_of(out.scores)
        decision["confidence"] = conf
        accepted = self.lam == -math.inf or (conf is not None and conf >= self.lam)
        final = out if accepted else engine.dense(case)[0]
        return replace(final, reused=bool(accepted and out.reused), decision=decision,
                       gate="accepted" if accepted else "fallback")


def _norm(opt: str, value: str) -> str:
    return canonical_cheap(value) if opt == "cheap" else str(value)
