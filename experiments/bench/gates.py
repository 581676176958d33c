"""``kvjudge bench gates``: the reuse frontier on held-out problems -- JCR against cost, per gate.

Gates are calibrated on ``--calibration`` (:mod:`kvjudge.experiments.calibrate_gate`: ``margin`` and ``risk``, one gate per
alpha and cheap path) and every point is measured on ``--test`` only (problems the calibration never
saw). Each test call is judged once by dense, by each cheap path (its answer and margin, timed), by each
cheap path with the risk probe (timed), and by DG-JKR. A gate's call is then composed from those
measured parts, call for call what ``selective`` does (``tests/test_gates.py``): accepted -> the cheap
answer at the cheap (+ probe) cost; fallback -> dense's answer at that cost plus dense's.

Points (JCR with Wilson 95% CI, Cohen's kappa over display slots vs dense, latency and prefilled tokens
as x dense): dense, each cheap path, selective (each cheap x score x alpha), the random gate at each
selective point's coverage (exactly ``round(coverage * n)`` calls take the cheap path, seeded), the
oracle gate (falls back exactly when the cheap path disagrees with dense), DG-JKR. Per selective point
also: coverage, realized disagreement among accepted calls vs alpha (+ its binomial 95% margin), and an
exact McNemar test of its per-call consistency against the random gate's at the same coverage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from kvjudge.experiments import gates as G
from kvjudge.experiments import metrics as M
from kvjudge.experiments.calibrate_gate import collect_calls, confidence, fit_gate, read_sets
from kvjudge.judges import methods as registry
from kvjudge.judges.methods.random_gate import exact_coverage_choice
from kvjudge.judges.methods.selective import canonical_cheap

DEFAULT_ALPHAS = (0.02, 0.05, 0.1)
PARTIAL_POINTS = ("partial:16",)  # benched when a ``partial`` method is registered


def default_cheaps() -> list[str]:
    """``naive``, plus :data:`PARTIAL_POINTS` when ``partial`` is registered."""
    return ["naive"] + (list(PARTIAL_POINTS) if "partial" in registry.METHODS else [])


def point(name: str, calls: Sequence[dict], accepted: Sequence[bool], side: str, cost: Callable[[dict, bool], tuple]) -> dict:
    """One frontier point: per call, the cheap ``side``'s answer when ``accepted`` else dense's;
    ``cost(call, accepted) -> (latency_ms, prefilled)``."""
    winners = [c[side]["winner"] if a else c["dense"]["winner"] for c, a in zip(calls, accepted)]
    slots = [c[side]["slot"] if a else c["dense"]["slot"] for c, a in zip(calls, accepted)]
    cons = [w is not None and w == c["dense"]["winner"] for w, c in zip(winners, calls)]
    lat, pre = zip(*(cost(c, a) for c, a in zip(calls, accepted)))
    d_lat = sum(c["dense"]["latency_ms"] for c in calls) / len(calls)
    d_pre = sum(c["dense"]["prefilled"] for c in calls) / len(calls)
    lo, hi = G.wilson(sum(cons), len(cons))
    dense_slots = [c["dense"]["slot"] for c in calls]
    return {"name": name, "n": len(calls), "jcr": sum(cons) / len(cons), "jcr_ci": [lo, hi],
            "kappa": G.kappa(slots, dense_slots), "p_e": G.chance(slots, dense_slots),
            "coverage": sum(accepted) / len(calls),
            "latency_ms": sum(lat) / len(lat), "latency_x_dense": (sum(lat) / len(lat)) / d_lat if d_lat else None,
            "prefilled_x_dense": (sum(pre) / len(pre)) / d_pre if d_pre else None, "consistent": cons}


def _cost(side: str, fallback: bool = True) -> Callable[[dict, bool], tuple]:
    def cost(c: dict, accepted: bool) -> tuple:
        extra = (0.0, 0.0) if accepted or not fallback else (c["dense"]["latency_ms"], c["dense"]["prefilled"])
        return c[side]["latency_ms"] + extra[0], c[side]["prefilled"] + extra[1]
    return cost


def frontier(calls_by_cheap: dict[str, list[dict]], gates: dict[tuple[str, str, float], dict], seed: int = 0) -> dict:
    """Every point of the frontier on the test calls (see the module docstring); ``gates[(cheap, score,
    alpha)]`` are the calibrated gate dicts."""
    first = next(iter(calls_by_cheap.values()))
    n = len(first)
    points = [point("dense", first, [False] * n, "cheap", lambda c, a: (c["dense"]["latency_ms"], c["dense"]["prefilled"]))]
    if "dg_jkr" in first[0]:
        points.append(point("dg_jkr", first, [True] * n, "dg_jkr", _cost("dg_jkr", False)))
    selective = []
    for cheap, calls in calls_by_cheap.items():
        points.append(point(cheap, calls, [True] * n, "cheap", _cost("cheap", False)))
        oracle = [c["agree"] for c in calls]
        points.append({**point(f"oracle gate ({cheap})", calls, oracle, "cheap", _cost("cheap")), "kind": "oracle"})
        for (gc, score, alpha), gate in sorted(gates.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if gc != cheap:
                continue
            lam = math.inf if gate["lambda"] is None else gate["lambda"]
            side = "cheap" if score == "margin" else "risk"
            acc = [confidence(c, score, gate["risk"]) >= lam for c in calls]
            p = point(f"selective {score} a={alpha:g} ({cheap})", calls, acc, side, _cost(side))
            k = sum(acc)
            errs = sum(1 for c, a in zip(calls, acc) if a and not c["agree"])
            rnd_acc = exact_coverage_choice(n, k / n, seed)
            rnd = point(f"random gate cov={k / n:.2f} ({cheap})", calls, rnd_acc, "cheap", _cost("cheap"))
            test = M.paired_test([float(x) for x in p["consistent"]], [float(x) for x in rnd["consistent"]])
            margin = G.binomial_margin(alpha, k)
            p.update(kind="selective", cheap=cheap, score=score, alpha=alpha, delta=gate["delta"], **{"lambda": gate["lambda"]},
                     accepted=k, disagreement_accepted=errs / k if k else None, alpha_margin=margin,
                     guarantee_holds=(errs / k <= alpha + margin) if k else True,
                     vs_random={"jcr": rnd["jcr"], "p_value": test["p_value"], "a_only": test["a_only"],
                                "b_only": test["b_only"]})
            rnd["kind"] = "random"
            selective.append(p)
            points += [p, rnd]
    for p in points:
        p.setdefault("kind", p["name"].split(" ")[0])
    return {"points": points, "selective": [p["name"] for p in selective]}


def bench_gates(calibration: str | Path, test: str | Path, out_dir: str | Path, model: str = "smollm2-135m",
                alphas: Sequence[float] = DEFAULT_ALPHAS, delta: float = 0.1, cheaps: Sequence[str] | None = None,
                data_calibration: str | None = None, data_test: str | None = None, candidate_kv: str = "agent",
                debias: str = "none", seeds: Sequence[int] = (42,), limit_calibration: int | None = None,
                limit_test: int | None = None, fit_share: float = 0.5, dg_jkr: bool = True, device: str | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Calibrate on ``calibration``, measure on ``test``; writes ``bench_gates.json``, ``frontier.png``,
    ``frontier.md`` and the gate files (``gates/``) into ``out_dir``; returns the JSON's dict."""
    from kvjudge.judges.judge import Judge
    from kvjudge.models import load_model

    for a in alphas:
        if not 0 < a < 1:
            raise ValueError(f"--alphas: every alpha must be in (0, 1), got {a}")
    cheaps = [canonical_cheap(c) for c in (cheaps or default_cheaps())]
    cal_sets = read_sets(calibration, data_calibration, 0, limit_calibration, candidate_kv)
    test_sets = read_sets(test, data_test, 0, limit_test, candidate_kv)
    overlap = {s.cs.task_id for s in cal_sets} & {s.cs.task_id for s in test_sets}
    if overlap:
        raise ValueError(f"calibration and test share {len(overlap)} problem(s) (e.g. {sorted(overlap)[0]}): "
                         "the test must be held out")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = Judge(load_model(model, device=device), candidate_kv=candidate_kv, output="label", debias=debias)
    gates: dict[tuple[str, str, float], dict] = {}
    test_calls: dict[str, list[dict]] = {}
    dense_cal: dict[tuple[str, int], dict] = {}  # dense is judged once per call, whatever the cheap paths
    dense_test: dict[tuple[str, int], dict] = {}
    for i, cheap in enumerate(cheaps):
        cal = collect_calls(judge, cal_sets, seeds, cheap, probe=True, progress=progress, dense=dense_cal)
        for score in G.SCORES:
            risk = None
            for alpha in alphas:
                gate = fit_gate(cal, score, alpha, delta, fit_share, risk)
                risk = gate["risk"]  # one risk model per cheap path (fitted on the fit share), every alpha
                gates[(cheap, score, alpha)] = gate
                name = f"{cheap.replace(':', '_').replace('=', '')}-{score}-a{alpha:g}.json"
                (out / "gates").mkdir(exist_ok=True)
                (out / "gates" / name).write_text(json.dumps(gate, indent=1) + "\n", encoding="utf-8")
        extra = ("dg_jkr",) if dg_jkr and i == 0 else ()
        test_calls[cheap] = collect_calls(judge, test_sets, seeds, cheap, probe=True, methods=extra, progress=progress,
                                          dense=dense_test)
    if dg_jkr and len(cheaps) > 1:
        for cheap in cheaps[1:]:
            for c, d in zip(test_calls[cheap], test_calls[cheaps[0]]):
                c["dg_jkr"] = d["dg_jkr"]
    result = frontier(test_calls, gates)
    result["config"] = {"model": model, "model_id": judge.lm.model_id, "candidate_kv": candidate_kv, "output": "label",
                        "debias": debias, "alphas": list(alphas), "delta": delta, "cheaps": cheaps, "seeds": list(seeds),
                        "calibration": str(calibration), "test": str(test), "calibration_problems": len(cal_sets),
                        "test_problems": len(test_sets), "fit_share": fit_share,
                        "latency": "composed per call from measured parts (see experiments/bench/gates.py)"}
    (out / "bench_gates.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "frontier.md").write_text(markdown(result), encoding="utf-8")
    plot(result, out / "frontier.png")
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    """The frontier as a markdown table (one row per point)."""
    rows = ["| point | JCR [95% CI] | p_e | kappa | coverage | latency x dense | prefilled x dense | "
            "disagree among accepted (alpha) | vs random gate (McNemar p) |",
            "|---|---|---:|---|---:|---:|---:|---|---|"]
    for p in result["points"]:
        kap = "-" if p["kappa"] is None else f"{p['kappa']:.2f}"
        sel = p.get("kind") == "selective"
        dis = (f"{_pct(p['disagreement_accepted'])} ({p['alpha']:g}{'' if p['guarantee_holds'] else ', MISSED'})"
               if sel else "")
        vs = f"{_pct(p['vs_random']['jcr'])} (p={p['vs_random']['p_value']:.3g})" if sel else ""
        rows.append(f"| {p['name']} | {_pct(p['jcr'])} [{_pct(p['jcr_ci'][0])}, {_pct(p['jcr_ci'][1])}] | {_pct(p.get('p_e'))} | {kap} | "
                    f"{_pct(p['coverage'])} | {p['latency_x_dense']:.2f} | {p['prefilled_x_dense']:.2f} | {dis} | {vs} |")
    return "\n".join(rows) + "\n"


def plot(result: dict, path: Path) -> None:
    """JCR (with Wilson CI) against latency x dense, one marker per kind of point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("k", "s"), "naive": ("tab:red", "o"), "partial": ("tab:orange", "o"),
             "selective": ("tab:blue", "D"), "random": ("tab:gray", "x"), "oracle": ("tab:green", "^"),
             "dg_jkr": ("tab:purple", "P")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for p in result["points"]:
        kind = p.get("kind", "")
        kind = "partial" if kind.startswith("partial") else kind
        color, marker = style.get(kind, ("tab:olive", "o"))
        y, (lo, hi) = p["jcr"], p["jcr_ci"]
        ax.errorbar(p["latency_x_dense"], y, yerr=[[y - lo], [hi - y]], fmt=marker, color=color, capsize=2,
                    label=None if kind in seen else kind)
        seen.add(kind)
    ax.set_xlabel("latency x dense (measured)")
    ax.set_ylabel("JCR vs dense (Wilson 95% CI)")
    ax.set_title(f"gate frontier on held-out problems ({result['config']['test_problems']} problems)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
