"""`kvjudge eval`: shuffles mapped back to original candidates, metric aggregation, resume, end to end."""

from __future__ import annotations

import json
import math
import random

import pytest

from kvjudge.app.cli import main
import kvjudge.experiments.protocol as protocol
from kvjudge.experiments.candidates import CandidateSet, load_candidates, with_agent_prompts, write_candidates
from kvjudge.experiments.datasets import load_dataset
from kvjudge.experiments.config import EvalConfig, parse_methods, parse_seeds
from kvjudge.experiments.judging import gate_seed, judge_all, permutation, record_key, running_metrics, to_original
from kvjudge.experiments.protocol import evaluate
from kvjudge.sandbox import isolation_level
from kvjudge.judges.base import Verdict
from kvjudge.topologies import load_topology, resolve_topology
from kvjudge.runtime.results import ResultsLog

METHODS = ["dense", "naive", "kvcomm", "pal_kv", "random_gate", "dg_jkr"]


# ------------------------------------------------------------------ hand-made shuffles with a stub judge

class StubJudge:
    """dense picks the candidate containing WIN; naive always picks display slot 1."""

    candidate_kv, model_id = "judge_prefix", "stub"

    def __init__(self) -> None:
        self.calls = []

    def prefetch(self, problem, candidates):
        return None

    def method(self, name, **options):
        return None

    def judge(self, problem, candidates, method=None, sources=None):
        self.calls.append((method, tuple(candidates)))
        slot = next(i for i, c in enumerate(candidates) if "WIN" in c) + 1 if method == "dense" else 1
        scores = [0.0] * len(candidates)
        scores[slot - 1] = 1.0
        return Verdict(method=method, winner=slot, scores=scores, reused=method != "dense", latency_ms=1.0,
                       prefilled_tokens=0, encoded_tokens=0, decision=None)


def test_permutation_is_seeded_and_maps_back():
    perm = permutation(42, "HumanEval/0", 4)
    assert sorted(perm) == [0, 1, 2, 3] and perm == permutation(42, "HumanEval/0", 4)
    assert any(permutation(s, "HumanEval/0", 4) != perm for s in (123, 456, 7, 8))
    assert to_original([2, 0, 3, 1], 1) == 2 and to_original([2, 0, 3, 1], 4) == 1
    with pytest.raises(ValueError):
        to_original([0, 1], 3)


def test_winners_mapped_back_through_permutations(tmp_path):
    problems = [{"id": f"t{k}", "prompt": f"problem {k}"} for k in range(6)]
    sets = {p["id"]: CandidateSet(p["id"], ["a", "b WIN", "c", "d"], ["a1", "a2", "a3", "a4"]) for p in problems}
    passes = {p["id"]: [False, True, False, False] for p in problems}
    log = ResultsLog(tmp_path / "results.jsonl", key=record_key)
    judge = StubJudge()
    judge_all(judge, problems, sets, passes, [42, 123], ["dense", "naive"], log)
    assert len(log.records) == 6 * 2 * 2
    for rec in log.latest():
        tid, seed, method = record_key(rec)
        perm = permutation(seed, tid, 4)
        assert rec["permutation"] == perm
        if method == "dense":
            # WIN moves around the display slots, but it is always original candidate 1
            assert rec["winner_slot"] == perm.index(1) + 1 and rec["winner_original"] == 1 and rec["passed"]
        else:
            assert rec["winner_slot"] == 1 and rec["winner_original"] == perm[0]
            assert rec["consistent"] == (perm[0] == 1) and rec["passed"] == (perm[0] == 1)
    # the judge saw the shuffled texts
    shown = {c for m, c in judge.calls if m == "dense"}
    assert len(shown) > 1


# ------------------------------------------------------------------ aggregation with the tiny judge

GSM = [("What is 2 + 3?", 5), ("What is 10 - 4?", 6), ("What is 3 * 3?", 9), ("What is 8 / 2?", 4)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"step\n#### {a}"}) + "\n" for q, a in GSM))
    cands = root / "cands.jsonl"
    with cands.open("w") as fh:
        for i, (q, a) in enumerate(GSM):
            texts = [f"The answer is {a + d}." for d in (0, 1, -1, 2)]
            fh.write(json.dumps({"task_id": f"gsm8k/{i}", "candidates": texts, "sources": ["a1", "a2", "a3", "a4"]})
                     + "\n")
    return root, data, cands


def _cfg(root, data, cands, out, seeds="42,123", resume=False):
    return EvalConfig(dataset="gsm8k", out=root / out, model="tiny-llama", methods=",".join(METHODS), seeds=seeds,
                      candidates=cands, data=str(data), resume=resume, candidate_kv="judge_prefix")


@pytest.fixture(scope="module")
def summary(synthetic):
    root, data, cands = synthetic
    return evaluate(_cfg(root, data, cands, "run"), progress=False)


def _in01(x):
    return x is None or (0.0 <= x <= 1.0)


def test_metric_aggregation(summary, synthetic):
    ms = summary["methods"]
    assert list(ms) == METHODS
    assert ms["dense"]["jcr"] == 1.0 and ms["dense"]["jcr_f"] == 1.0
    assert ms["dense"]["reuse_rate"] == 0.0 and ms["naive"]["reuse_rate"] == 1.0
    assert ms["dense"]["coverage"] is None and ms["naive"]["coverage"] is None
    assert ms["dense"]["latency_ratio"] == pytest.approx(1.0)
    for m, r in ms.items():
        assert r["n"] == 4 * 2
        for k in ("pass_at_1", "jcr", "jcr_f", "reuse_rate", "coverage"):
            assert _in01(r[k]), (m, k, r[k])
            if r[k] is not None:
                lo, hi = r[f"{k}_ci"]
                assert lo - 1e-9 <= r[k] <= hi + 1e-9
        assert len(r["jcr_mean_std"]) == 2 and r["latency_ms"] > 0
        # pooled JCR is the mean of the per-seed JCRs (equal problem counts per seed)
        assert r["jcr_mean_std"][0] == pytest.approx(r["jcr"])
    # candidate 0 is the right answer: pass@1 of dense = how often dense picks it
    assert ms["dense"]["pass_at_1"] in {k / 8 for k in range(9)}
    # DG-JKR: reuse exactly where it accepted; random gate matched to its per-seed coverage
    dg = ms["dg_jkr"]
    assert dg["coverage"] == pytest.approx(dg["reuse_rate"])
    cov = summary["config"]["random_gate_coverage"]
    for seed in ("42", "123"):
        assert cov[seed] == pytest.approx(dg["per_seed"][seed]["coverage"])
        assert ms["random_gate"]["per_seed"][seed]["coverage_target"] == pytest.approx(cov[seed])
    # eq. 2: JCR_gated = d + (1 - d) p
    if dg["precision"] is not None:
        assert dg["jcr"] == pytest.approx((1 - dg["coverage"]) + dg["coverage"] * dg["precision"])
    sig = summary["significance"]["dg_jkr_vs_random_gate"]
    assert 0.0 <= sig["p_value"] <= 1.0 and sig["n"] == 8
    part, pooled = summary["partition"], summary["partition_pooled"]
    assert part["agreement"]["count"] + part["disagreement"]["count"] == 4 and "seed 42" in part["unit"]  # the paper's
    assert pooled["agreement"]["count"] + pooled["disagreement"]["count"] == 8
    # exact coverage: per seed, exactly round(coverage x n) records took the gate's reuse arm
    for seed in ("42", "123"):
        got = ms["random_gate"]["per_seed"][seed]["coverage"]
        assert got * 4 == round(cov[seed] * 4)
    assert all(r["measured_rate"] == 0.0 for m, r in ms.items() if m in ("dense", "naive"))
    assert ms["dg_jkr"]["latency_ms_parallel_arms"] > 0


def test_results_lines_and_files(summary, synthetic):
    root = synthetic[0]
    lines = [json.loads(x) for x in (root / "run" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 2 * len(METHODS)
    keys = {"task_id", "seed", "method", "permutation", "winner_slot", "winner_original", "passed", "consistent",
            "reused", "latency_ms", "decision"}
    assert all(keys <= set(r) for r in lines)
    dense = {(r["task_id"], r["seed"]): r["winner_original"] for r in lines if r["method"] == "dense"}
    for r in lines:
        assert r["winner_original"] == r["permutation"][r["winner_slot"] - 1]
        assert r["consistent"] == (r["winner_original"] == dense[(r["task_id"], r["seed"])])
    assert load_candidates(root / "run" / "candidates.jsonl").keys() == {f"gsm8k/{i}" for i in range(4)}
    for name in ("summary.json", "report.md", "jcr_vs_coverage.png", "latency_ratio.png"):
        assert (root / "run" / name).stat().st_size > 0


def test_resume_skips_done_triples(summary, synthetic):
    root, data, cands = synthetic
    path = root / "run" / "results.jsonl"
    before = path.read_text().splitlines()
    with pytest.raises(ValueError, match="--resume"):
        evaluate(_cfg(root, data, cands, "run"), progress=False)
    evaluate(_cfg(root, data, cands, "run", resume=True), progress=False)
    assert path.read_text().splitlines() == before  # nothing re-judged
    # a torn last line and a new seed: only the missing triples are judged
    with path.open("a") as fh:
        fh.write('{"task_id": "gsm8k/0", "se')
    again = evaluate(_cfg(root, data, cands, "run", seeds="42,123,456", resume=True), progress=False)
    lines = path.read_text().splitlines()
    assert lines[: len(before)] == before  # the torn line was dropped, the rest kept
    good = [json.loads(x) for x in lines[len(before):]]
    assert len(good) == 4 * len(METHODS) and {r["seed"] for r in good} == {456}
    assert again["methods"]["dense"]["n"] == 12


def test_resume_generates_only_untried_problems(synthetic, monkeypatch):
    """Kept sets win, failed problems are not retried, only new problems reach generation."""
    root, data, _ = synthetic
    out = root / "gen-resume"
    (out / "generation").mkdir(parents=True)
    texts = [f"The answer is {x}." for x in (5, 6, 7, 8)]
    rec = lambda i, status: {"id": f"gsm8k/{i}", "status": status,  # noqa: E731
                             "candidates": [{"text": t, "agent": f"a{j}"} for j, t in enumerate(texts)]}
    # problem 0 judged before (in candidates.jsonl), 1 generated but not yet written there, 2 failed
    (out / "generation" / "results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in (rec(0, "ok"), rec(1, "ok"), rec(2, "error"))))
    kept = CandidateSet("gsm8k/0", ["kept 1", "kept 2", "kept 3", "kept 4"], ["a1", "a2", "a3", "a4"])
    write_candidates(out / "candidates.jsonl", [kept])
    asked = []

    def fake_generation(cfg, problems, reporter):
        asked.append([p["id"] for p in problems])
        with (cfg.out / "generation" / "results.jsonl").open("a") as fh:
            for p in problems:
                fh.write(json.dumps(rec(p["id"].split("/")[1], "ok")) + "\n")

    monkeypatch.setattr(protocol, "generate_candidates", fake_generation)
    cfg = EvalConfig(dataset="gsm8k", out=out, model="tiny-llama", methods="dense,naive", seeds="42",
                     data=str(data), resume=True, limit=4, candidate_kv="judge_prefix")
    result = evaluate(cfg, progress=False)
    assert asked == [["gsm8k/3"]]  # only the never-tried problem
    sets = load_candidates(out / "candidates.jsonl")
    assert list(sets) == ["gsm8k/0", "gsm8k/1", "gsm8k/3"]  # the failed one is left out
    assert sets["gsm8k/0"].candidates == kept.candidates  # what was judged before is kept
    assert result["config"]["n_problems"] == 3 and result["config"]["torch_threads"] >= 1
    evaluate(cfg, progress=False)  # resuming again generates nothing
    assert asked == [["gsm8k/3"]]


def test_parse_flags():
    assert parse_methods("naive,dg_jkr,naive") == ["dense", "naive", "dg_jkr"]
    assert parse_seeds("42, 123") == [42, 123]
    for bad in ("", "1,1", "x"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="unknown judge method 'nope'"):
        parse_methods("dense,nope")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "naive,bogus"], "unknown judge method 'bogus'"),
    (["--seeds", "42,abc"], "'abc' is not an integer"),
    (["--candidates", "/no/such/cands.jsonl"], "--candidates: file not found"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_bad_flags_one_line(capsys, argv, message):
    assert main(["eval", "humaneval", "--model", "tiny-llama", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# ------------------------------------------------------------------ end to end through Ray

def test_eval_humaneval_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval-humaneval"
    # one seed keeps the file fast on a 2-core machine (the seed loop is covered above)
    # generated code needs sandbox isolation; a machine without any still runs the protocol, unsafely
    unsafe = ["--unsafe-exec"] if isolation_level() == "none" else []
    code = main(["eval", "humaneval", "--model", "tiny-llama", "--limit", "3", "--seeds", "42", "--out", str(out),
                 *unsafe])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"config", "methods", "significance", "partition"}
    assert summary["config"]["n_problems"] == 3 and summary["config"]["seeds"] == [42]
    assert set(summary["methods"]) == set(METHODS)
    for r in summary["methods"].values():
        assert {"pass_at_1", "jcr", "jcr_f", "reuse_rate", "coverage", "latency_ms", "jcr_ci", "jcr_mean_std"} <= set(r)
        for k in ("pass_at_1", "jcr", "jcr_f", "reuse_rate", "coverage"):
            assert _in01(r[k])
        assert math.isfinite(r["latency_ms"])
    assert summary["methods"]["dense"]["jcr"] == 1.0
    cands = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 3 and all(len(c["candidates"]) == 4 == len(c["sources"]) for c in cands)
    assert len((out / "results.jsonl").read_text().splitlines()) == 3 * len(METHODS)
    report = (out / "report.md").read_text()
    for needle in ("Table 1", "Table 2", "Table 3", "Table 4", "| Method | Pass@1 (%) | JCR (%)", "tiny-llama",
                   "74.38", "425.39", "80.00 ± 0.62"):
        assert needle in report, needle
    assert (out / "jcr_vs_coverage.png").stat().st_size > 1000
    assert (out / "latency_ratio.png").stat().st_size > 1000

    # agent prompts rebuilt from the topology's templates equal those the agents were really given
    sets = load_candidates(out / "candidates.jsonl")
    recorded = {t: cs.agent_prompts for t, cs in sets.items()}
    assert all(recorded.values())
    for cs in sets.values():
        cs.agent_prompts = None
    problems = {p["id"]: p["prompt"] for p in load_dataset("humaneval", limit=3)}
    assert with_agent_prompts(sets, problems, load_topology(resolve_topology("progressive_refinement"))) == 3
    assert {t: cs.agent_prompts for t, cs in sets.items()} == recorded

    # --resume with a larger --limit generates only the new problem and keeps the old candidates
    gen_before = (out / "generation" / "results.jsonl").read_text().splitlines()
    code = main(["eval", "humaneval", "--model", "tiny-llama", "--limit", "4", "--seeds", "42", "--out", str(out),
                 *unsafe, "--resume"])
    assert code == 0, capsys.readouterr().err
    gen_after = (out / "generation" / "results.jsonl").read_text().splitlines()
    assert gen_after[:3] == gen_before[:3] and len(gen_after) == 4
    again = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert again[:3] == cands and len(again) == 4
    assert len((out / "results.jsonl").read_text().splitlines()) == 4 * len(METHODS)
    assert json.loads((out / "summary.json").read_text())["config"]["n_problems"] == 4


def test_running_metrics_line(tmp_path):
    log = ResultsLog(tmp_path / "results.jsonl", key=record_key)
    rows = [("t1", "dense", True, True), ("t2", "dense", False, True),
            ("t1", "naive", True, True), ("t2", "naive", True, False)]
    for tid, method, passed, consistent in rows:
        log.append({"task_id": tid, "seed": 42, "method": method, "passed": passed, "consistent": consistent})
    assert running_metrics(log) == "pass@1 0.50  JCR naive 0.50"


def test_gate_draws_are_uniform_across_problems():
    """The per-(seed, problem) gate seeds must give independent, uniform first draws."""
    draws = [random.Random(gate_seed(s, f"mmlu/{i}")).random() for s in (42, 123, 456) for i in range(200)]
    assert 0.82 < sum(d < 0.87 for d in draws) / len(draws) < 0.92
    assert max(draws) > 0.95 and min(draws) < 0.05


def test_rescore_from_equals_judging_under_the_other_prior(synthetic, tmp_path, monkeypatch):
    """--rescore-from: a raw run's dense and naive calls re-scored under a pride prior give, call for
    call, the winners and scores that judging again with that prior gives; other methods are judged."""
    from kvjudge.judges.debias import PriorTable, log_softmax
    from kvjudge.judges.judge import Judge
    from kvjudge.models import load_model

    monkeypatch.setenv("KVJUDGE_CACHE", str(tmp_path / "cache"))
    root, data, cands = synthetic
    key = Judge(load_model("tiny-llama")).prior_key("pride", "judge_prefix", "label", 4)
    table = PriorTable(key)
    for m, prior in (("dense", [0.0, 0.5, 1.0, 3.0]), ("naive", [2.0, 0.0, 0.5, 0.0]), ("kvcomm", [0.0] * 4)):
        table.put(m, log_softmax(prior), 4, ["x"])
    table.save()

    def cfg(out, debias, methods="dense,naive", rescore=None):
        return EvalConfig(dataset="gsm8k", out=tmp_path / out, model="tiny-llama", methods=methods, seeds="42,123",
                          candidates=cands, data=str(data), candidate_kv="judge_prefix", judge_debias=debias,
                          rescore_from=rescore)

    from kvjudge.judges.debias import PriorError

    with pytest.raises(PriorError, match=r"for judge method pal_kv, partial \(.*--methods pal_kv,partial"):
        evaluate(cfg("missing", "pride", "dense,naive,pal_kv,partial"), progress=False)  # every missing one, at once
    assert not (tmp_path / "missing" / "results.jsonl").exists()
    evaluate(cfg("raw", "none"), progress=False)
    evaluate(cfg("re", "pride", "dense,naive,kvcomm", rescore=tmp_path / "raw"), progress=False)
    evaluate(cfg("judged", "pride"), progress=False)
    read = lambda out: {record_key(r): r for r in map(json.loads, (tmp_path / out / "results.jsonl").open())}  # noqa: E731
    raw, re_, judged = read("raw"), read("re"), read("judged")
    assert len(judged) == 4 * 2 * 2 and set(judged) < set(re_)
    for k, r in judged.items():
        assert re_[k]["rescored_from"] == str(tmp_path / "raw") and re_[k]["debias"] == "pride"
        assert re_[k]["winner_slot"] == r["winner_slot"] and re_[k]["consistent"] == r["consistent"]
        assert re_[k]["scores"] == pytest.approx(r["scores"], abs=1e-4)
    assert any(raw[k]["winner_slot"] != r["winner_slot"] for k, r in judged.items())  # the prior mattered
    assert all("rescored_from" not in r for k, r in re_.items() if k[2] == "kvcomm")  # judged, not re-scored
    with pytest.raises(ValueError, match="candidate_kv"):
        evaluate(EvalConfig(dataset="gsm8k", out=tmp_path / "bad", model="tiny-llama", methods="dense", seeds="42",
                            candidates=cands, data=str(data), candidate_kv="isolated", judge_debias="pride",
                            rescore_from=tmp_path / "raw"), progress=False)


def test_rescore_from_a_run_that_generated_its_candidates(tmp_path):
    """A source run that generated its sets is matched through the candidates.jsonl it wrote: passing
    that file as --candidates is accepted, any other file is refused naming the field."""
    from kvjudge.experiments.rescore import check_source
    from kvjudge.runtime.manifest import file_digest

    src = tmp_path / "src"
    src.mkdir()
    (src / "candidates.jsonl").write_text('{"task_id": "t1", "candidates": ["a", "b"]}\n')
    (src / "results.jsonl").write_text('{"task_id": "t1", "seed": 42, "method": "dense"}\n')
    base = {"model": "m", "dataset": "gsm8k", "candidate_kv": "agent", "judge_output": "label",
            "judge_permutations": 1, "compress": None}
    (src / "manifest.json").write_text(json.dumps({**base, "candidates": "generated"}))
    ours = {**base, "candidates": file_digest(src / "candidates.jsonl")}
    assert check_source(src, ours) == [{"task_id": "t1", "seed": 42, "method": "dense"}]
    other = tmp_path / "other.jsonl"
    other.write_text('{"task_id": "t1", "candidates": ["a", "c"]}\n')
    with pytest.raises(ValueError, match="its candidates is 'sha256:"):
        check_source(src, {**base, "candidates": file_digest(other)})


def test_priors_are_checked_before_judging_for_the_random_gates_arm(synthetic, tmp_path, monkeypatch):
    """The pre-check reads the random gate's --gate-arm prior (and dense's), not a default arm's: with only
    dense's and kvcomm's priors saved, ``--gate-arm kvcomm`` judges, ``naive`` is refused naming naive."""
    from kvjudge.judges.debias import PriorError, PriorTable, log_softmax
    from kvjudge.judges.judge import Judge
    from kvjudge.models import load_model

    monkeypatch.setenv("KVJUDGE_CACHE", str(tmp_path / "cache"))
    root, data, cands = synthetic
    table = PriorTable(Judge(load_model("tiny-llama")).prior_key("pride", "judge_prefix", "label", 4))
    for m in ("dense", "kvcomm"):
        table.put(m, log_softmax([0.0, 0.5, 1.0, 3.0]), 4, ["x"])
    table.save()

    def cfg(out, arm):
        return EvalConfig(dataset="gsm8k", out=tmp_path / out, model="tiny-llama", methods="dense,random_gate",
                          seeds="42", candidates=cands, data=str(data), candidate_kv="judge_prefix",
                          judge_debias="pride", gate_arm=arm, limit=2)

    with pytest.raises(PriorError, match=r"for judge method naive \("):
        evaluate(cfg("naive-arm", "naive"), progress=False)
    summary = evaluate(cfg("kvcomm-arm", "kvcomm"), progress=False)
    assert summary["methods"]["random_gate"]["n"] == 2
