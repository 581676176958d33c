"""Selective gates: the calibration guarantee on a synthetic stream, the selective method's endpoints
against dense and its cheap path, and gate files refused outside what they were fitted for."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from kvjudge.experiments import gates as G


# ---------------------------------------------------------------------------- the calibration math
def _risk_above(lam: float) -> float:
    """Disagreement among accepted calls of the synthetic stream, exactly: s ~ U(0, 1) and
    P(disagree | s) = 0.4 (1 - s)^2, so E[f(s) | s >= lam] = 0.4 (1 - lam)^2 / 3 (0 when nothing is
    accepted)."""
    return 0.0 if lam >= 1 else 0.4 * (1 - lam) ** 2 / 3


def _calibrate(rng: np.random.Generator, n: int, alpha: float, delta: float, bound: str = "cp") -> float:
    s = rng.random(n)
    err = rng.random(n) < 0.4 * (1 - s) ** 2
    if bound == "cp":
        return G.fixed_sequence_lambda(s, err, alpha, delta, G.grid("risk", 200))["lambda"]
    # the same walk with the plain empirical rate instead of the upper bound (no guarantee)
    order = np.argsort(-s)
    lam = math.inf
    for t in G.grid("risk", 200):
        k = int((s >= t).sum())
        if k < max(G.MIN_ACCEPTED, G.min_calls(alpha, delta)):
            continue
        if err[order[:k]].mean() > alpha:
            break
        lam = t
    return lam


def test_clopper_pearson_matches_the_binomial_tail():
    """The bound u solves P(Binom(n, u) <= k) = delta (closed form of the exact one-sided bound)."""
    for k, n, d in ((0, 30, 0.1), (3, 50, 0.1), (10, 200, 0.05)):
        u = G.clopper_pearson_upper(k, n, d)
        assert stats.binom.cdf(k, n, u) == pytest.approx(d, abs=1e-9)
    assert G.clopper_pearson_upper(5, 5, 0.1) == 1.0


def test_calibrated_lambda_keeps_the_risk_in_1_minus_delta_of_200_calibrations():
    alpha, delta = 0.05, 0.1
    rng = np.random.default_rng(0)
    lams = [_calibrate(rng, 500, alpha, delta) for _ in range(200)]
    held = [_risk_above(lam) <= alpha for lam in lams]
    assert sum(held) / len(held) >= 1 - delta
    assert np.mean([lam < 1 for lam in lams]) > 0.9  # it does accept: the guarantee is not bought by never reusing


def test_the_guarantee_needs_the_bound():
    """The same walk on the empirical rate breaks the guarantee on this stream (so the test above can fail)."""
    alpha, delta = 0.05, 0.1
    rng = np.random.default_rng(0)
    lams = [_calibrate(rng, 500, alpha, delta, bound="empirical") for _ in range(200)]
    assert np.mean([_risk_above(lam) <= alpha for lam in lams]) < 1 - delta


def test_too_few_accepted_or_failing_first_threshold_never_accepts():
    s = [0.9] * 10 + [0.1] * 100
    err = [False] * 10 + [True] * 100
    assert G.fixed_sequence_lambda(s, err, 0.05, 0.1, G.grid("risk"))["lambda"] == math.inf


def test_margin_grid_and_kappa_and_wilson():
    g = G.grid("margin", 4)
    assert g == sorted(g, reverse=True) and g[-1] == 0.0
    assert g[0] == pytest.approx(-math.log(0.25))
    assert G.kappa([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    assert G.kappa([4, 4, 4], [4, 4, 4]) is None  # both always pick the same slot: undefined
    lo, hi = G.wilson(45, 50)
    assert lo < 0.9 < hi and hi <= 1


def test_risk_model_recovers_a_logistic_truth():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-(2.0 * x[:, 0] - 0.5)))
    fit = G.fit_risk(x, y, ["a", "b"], c=100.0)
    w = np.asarray(fit["coef"]) / np.asarray(fit["scale"])
    assert w[0] == pytest.approx(2.0, abs=0.25) and abs(w[1]) < 0.25


# ---------------------------------------------------------------------------- the selective method
from helpers import CANDIDATES, PROBLEM
ORDERS = [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)]


@pytest.mark.parametrize("mode", ["judge_prefix", "isolated"])
def test_selective_endpoints_equal_dense_and_the_cheap_path_call_for_call(llama, mode):
    from kvjudge.judges.judge import Judge

    judge = Judge(llama, candidate_kv=mode)
    never = judge.method("selective", gate=math.inf)
    always = judge.method("selective", gate=-math.inf)
    assert never.lam == math.inf and always.lam == -math.inf
    for order in ORDERS:
        shown = [CANDIDATES[i] for i in order]
        dense = judge.judge(PROBLEM, shown, method="dense")
        naive = judge.judge(PROBLEM, shown, method="naive")
        assert max(abs(a - b) for a, b in zip(dense.scores, naive.scores)) > 1e-4  # the endpoints differ
        judge._methods["selective"] = never
        hi = judge.judge(PROBLEM, shown, method="selective")
        judge._methods["selective"] = always
        lo = judge.judge(PROBLEM, shown, method="selective")
        assert hi.gate == "fallback" and not hi.reused and hi.winner == dense.winner
        assert hi.scores == pytest.approx(dense.scores, abs=1e-5)
        assert lo.gate == "accepted" and lo.reused and lo.winner == naive.winner
        assert lo.scores == pytest.approx(naive.scores, abs=1e-5)
        # the confidence is the naive path's top-two gap, read from its own scores
        top = sorted(naive.scores, reverse=True)
        assert lo.decision["confidence"] == pytest.approx(top[0] - top[1], abs=1e-5)


def test_selective_threshold_splits_on_the_margin(llama):
    from kvjudge.judges.judge import Judge

    judge = Judge(llama)
    margins = []
    for order in ORDERS:
        s = sorted(judge.judge(PROBLEM, [CANDIDATES[i] for i in order], method="naive").scores, reverse=True)
        margins.append(s[0] - s[1])
    lam = sorted(margins)[len(margins) // 2]
    judge.method("selective", gate=lam)
    gates = [judge.judge(PROBLEM, [CANDIDATES[i] for i in o], method="selective").gate for o in ORDERS]
    assert gates == ["accepted" if m >= lam else "fallback" for m in margins]


def test_risk_features_key_deviation_against_a_dense_prefill(llama):
    """Layer-1 key deviation is zero for slot 1 in judge_prefix mode (its KV is the real one) and matches
    an independent computation from the dense cache for the others."""
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.methods.selective import key_deviation

    judge = Judge(llama)
    case = judge.case(PROBLEM, CANDIDATES)
    devs, why = key_deviation(judge.engine, case)
    assert why is None and devs[0] == pytest.approx(0.0, abs=1e-8) and min(devs[1:]) > 1e-6
    _, kv = judge.runner.forward(case.prompt.ids(), keep_cache=True)
    for kind, slot, seg in judge.engine.pieces(case):
        if kind == "candidate":
            real = kv.keys[1][:, seg.start:seg.start + seg.length].float()
            want = ((real - seg.keys[1].float()) ** 2).sum((0, 2)).mean() / (real ** 2).sum((0, 2)).mean()
            assert devs[slot] == pytest.approx(float(want), rel=1e-3, abs=1e-7)


# ---------------------------------------------------------------------------- gate files
def _gate_file(tmp_path, judge, **change) -> str:
    from kvjudge.judges.methods.selective import GATE_VERSION

    case = judge.case(PROBLEM, CANDIDATES)
    fitted = judge.method("selective", gate=0.0).fitted_identity(judge.engine, case)
    gate = {"version": GATE_VERSION, "lambda": 0.0, "alpha": 0.05, "delta": 0.1, "n": 100, "risk": None,
            "fitted_for": {**fitted, **change}}
    path = tmp_path / "gate.json"
    path.write_text(json.dumps(gate))
    return str(path)


def test_gate_file_used_as_fitted_is_accepted(llama, tmp_path):
    from kvjudge.judges.judge import Judge

    judge = Judge(llama)
    judge.method("selective", gate=_gate_file(tmp_path, judge))
    v = judge.judge(PROBLEM, CANDIDATES, method="selective")
    assert v.gate == "accepted" and v.decision["lambda"] == 0.0


@pytest.mark.parametrize("change", [{"model_id": "another-model"}, {"candidate_kv": "agent"},
                                    {"prior": "pride:0123456789ab"}, {"cheap": "kvcomm"}])
def test_gate_file_fitted_for_something_else_is_refused_in_one_line(llama, tmp_path, change):
    """Another model, candidate-KV mode or slot prior; or a cheap path other than the one asked for
    (without ``cheap`` the gate's own is used)."""
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.prompt import JudgeInputError

    judge = Judge(llama)
    path = _gate_file(tmp_path, judge, **change)
    with pytest.raises(JudgeInputError) as err:
        judge.method("selective", gate=path, **({"cheap": "naive"} if "cheap" in change else {}))
        judge.judge(PROBLEM, CANDIDATES, method="selective")
    msg = str(err.value)
    assert "\n" not in msg and "fitted for" in msg and str(next(iter(change.values()))) in msg


def test_gate_refuses_generate_output_and_bad_files(llama, tmp_path):
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.methods import make_method
    from kvjudge.judges.prompt import JudgeInputError

    judge = Judge(llama, output="generate", max_new_tokens=4)
    judge.method("selective", gate=0.0)
    with pytest.raises(JudgeInputError, match="label output"):
        judge.judge(PROBLEM, CANDIDATES, method="selective")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for opts in ({"gate": str(bad)}, {"gate": str(tmp_path / "missing.json")}, {"cheap": "dense"},
                 {"cheap": "naive:foo=1"}, {"score": "risk", "gate": 0.5}):
        with pytest.raises(JudgeInputError) as err:
            make_method("selective", **opts)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- the commands, end to end (tiny-llama)
def _write_sets(path, first: int, count: int) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    with open(path, "w") as fh:
        for i in range(first, first + count):
            cands = [f"The answer is {i + k}. {words[(i + k) % 6]} " * (1 + k % 2) for k in range(3)]
            fh.write(json.dumps({"task_id": f"t{i}", "problem": f"What is {i} plus one?", "candidates": cands}) + "\n")


def test_calibrate_gate_then_judge_with_it_and_refuse_another_mode(tmp_path, capsys):
    from kvjudge.app.cli import main

    cands, gate = tmp_path / "cal.jsonl", tmp_path / "gate.json"
    _write_sets(cands, 0, 12)
    rc = main(["calibrate-gate", "--model", "tiny-llama", "--candidates", str(cands), "--candidate-kv", "judge_prefix",
               "--alpha", "0.4", "--delta", "0.5", "--seeds", "1,2,3", "--out", str(gate)])
    assert rc == 0 and "calibration calls accepted" in capsys.readouterr().out
    g = json.loads(gate.read_text())
    assert g["n"] == 36 and g["fitted_for"]["candidate_kv"] == "judge_prefix" and g["fitted_for"]["cheap"] == "naive"
    assert g["fitted_for"]["model_id"] and g["fitted_for"]["prior"] == "none" and g["fitted_for"]["output"] == "label"
    if g["lambda"] is not None:  # what it accepted meets its bound
        assert g["accepted"] >= 30 and G.clopper_pearson_upper(g["errors"], g["accepted"], 0.5) <= 0.4
    args = ["judge", "--model", "tiny-llama", "--problem", "What is 3 plus one?", "--candidate", "4", "--candidate", "5",
            "--method", "selective", "--gate", str(gate), "--json"]
    assert main(args + ["--candidate-kv", "judge_prefix"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["gate"] in ("accepted", "fallback") and verdict["decision"]["cheap"] == "naive"
    assert main(args + ["--candidate-kv", "isolated"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fitted for candidate kv 'judge_prefix'" in err
    assert main(args[:-1] + ["--method-option", "selective.colour=1"]) == 2
    assert "unknown option 'colour'" in capsys.readouterr().err


def test_bench_gates_frontier_on_held_out_problems(tmp_path, monkeypatch):
    from kvjudge.experiments.bench.gates import bench_gates
    from kvjudge.judges.judge import Judge

    dense_calls = []
    judge_fn = Judge.judge

    def counting(self, problem, candidates, method=None, **kw):
        dense_calls.extend([method] if method == "dense" else [])
        return judge_fn(self, problem, candidates, method=method, **kw)

    monkeypatch.setattr(Judge, "judge", counting)
    cal, test = tmp_path / "cal.jsonl", tmp_path / "test.jsonl"
    _write_sets(cal, 0, 12)
    _write_sets(test, 100, 5)
    res = bench_gates(cal, test, tmp_path / "out", model="tiny-llama", alphas=(0.3, 0.5), delta=0.5,
                      cheaps=["naive", "partial:2"], candidate_kv="judge_prefix", seeds=(1, 2, 3))
    # dense judged once per call (36 calibration + 15 test), not once per cheap path; + 1 warm-up per collection
    assert len(dense_calls) == 36 + 15 + 4
    pts = {p["name"]: p for p in res["points"]}
    assert pts["dense"]["jcr"] == 1 and pts["dense"]["latency_x_dense"] == pytest.approx(1.0)
    assert pts["oracle gate (naive)"]["jcr"] == 1
    assert pts["oracle gate (naive)"]["coverage"] == pytest.approx(pts["naive"]["jcr"])
    sel = [p for p in res["points"] if p["kind"] == "selective"]
    assert len(sel) == 8 and all(p["n"] == 15 for p in sel)  # 2 cheap paths x 2 scores x 2 alphas
    for p in sel:  # JCR of a gate = accepted calls that agree + every fallback (independent recount)
        k = p["accepted"]
        dis = 0 if not k else round(p["disagreement_accepted"] * k)
        assert p["jcr"] == pytest.approx((15 - dis) / 15)
        rnd = pts[f"random gate cov={k / 15:.2f} ({p['cheap']})"]
        assert rnd["coverage"] == pytest.approx(round(k / 15 * 15) / 15)
    assert "dg_jkr" in pts
    for p in res["points"]:  # p_e on the same calls as kappa: kappa = (JCR - p_e) / (1 - p_e)
        assert 0 < p["p_e"] <= 1
        if p["kappa"] is not None and p["p_e"] < 1:
            assert p["kappa"] == pytest.approx((p["jcr"] - p["p_e"]) / (1 - p["p_e"]))
    assert "| p_e |" in (tmp_path / "out" / "frontier.md").read_text()
    for f in ("bench_gates.json", "frontier.md", "frontier.png"):
        assert (tmp_path / "out" / f).is_file()


def test_selective_under_a_slot_prior_and_the_prior_in_the_gate_identity(llama, tmp_path, monkeypatch):
    """With a PriDe prior the cheap path's scores are debiased (selective at -inf == naive, debiased) and the
    identity names the prior, so a gate fitted under one prior is refused under another."""
    from kvjudge.judges.debias import PriorTable
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.prompt import JudgeInputError

    monkeypatch.setenv("KVJUDGE_CACHE", str(tmp_path))
    judge = Judge(llama, debias="pride")
    key = judge.prior_key("pride", "judge_prefix", "label", len(CANDIDATES))
    table = PriorTable(key)
    for m, prior in (("dense", [-1.0, -1.5, -1.2, -1.8]), ("naive", [-0.5, -2.0, -1.9, -1.7])):
        table.put(m, prior, 4, ["x"])
    table.save()
    judge.reload_priors()
    raw = Judge(llama).judge(PROBLEM, CANDIDATES, method="naive").scores
    judge.method("selective", gate=-math.inf)
    v = judge.judge(PROBLEM, CANDIDATES, method="selective")
    assert v.scores == pytest.approx([r - p for r, p in zip(raw, [-0.5, -2.0, -1.9, -1.7])], abs=1e-5)
    ident = judge.method("selective", gate=0.0).fitted_identity(judge.engine, judge.case(PROBLEM, CANDIDATES))
    assert ident["prior"].startswith("pride:")
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"version": 1, "lambda": 0.0, "risk": None, "fitted_for": ident}))
    judge.method("selective", gate=str(path))
    assert judge.judge(PROBLEM, CANDIDATES, method="selective").decision["lambda"] == 0.0
    table.put("naive", [-1.0, -1.0, -1.0, -1.0], 4, ["x"])  # another prior: the same gate is refused
    table.save()
    judge.reload_priors()
    with pytest.raises(JudgeInputError, match="fitted for prior"):
        judge.judge(PROBLEM, CANDIDATES, method="selective")
