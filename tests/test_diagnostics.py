"""`kvjudge diagnose`: answer-position attention against eager attention, hybrid and progressive
extremes against dense / naive, and a risk classifier that never trains on a problem it is tested on."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold
from sklearn.metrics import roc_auc_score

from kvjudge.cache.compat import cache_kwargs
from kvjudge.cache.segments import to_cache
from kvjudge.experiments.diagnostics import DiagnoseError, run_diagnose
from kvjudge.experiments.diagnostics.attention import _Recorder, answer_attention, method_attention, region_mass
from kvjudge.experiments.diagnostics.common import NO_AGENT_PROMPTS, Call, load_calls, make_judge, run_method
from kvjudge.experiments.diagnostics.hybrid import hybrid_logprobs, key_deviation
from kvjudge.experiments.diagnostics.progressive import jcr_by_n, progressive_rows
from kvjudge.experiments.diagnostics.risk import _classifier, auc_ci, gate_at_precision, grouped_heldout

PROBLEM = "What is 2+3?"
CANDS = ["It is 5.", "Seven, since 3+4 = 7", "five!", "The answer: 5"]


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    return m


def _eager_rows(model, ids, past=None) -> torch.Tensor:
    """The last position's attention ``[L, Hq, T]`` from full eager attention matrices."""
    start = sum(s.length for s in past) if past else 0
    with torch.no_grad():
        out = _eager(model)(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids))[None],
                            **cache_kwargs(model, to_cache(past, model.config) if past else None), use_cache=True,
                            output_attentions=True)
    return torch.stack([a[0, :, -1] for a in out.attentions])


def test_dense_answer_attention_equals_eager(tiny):
    judge = make_judge(tiny, "judge_prefix")
    case = judge.case(PROBLEM, CANDS[:3])
    ids = case.prompt.ids()
    logprobs, attn = answer_attention(tiny.model, ids)
    ref = _eager_rows(tiny.model, ids)
    assert attn.shape == ref.shape == (tiny.model.config.num_hidden_layers, tiny.model.config.num_attention_heads,
                                       len(ids))
    assert torch.allclose(attn, ref, atol=1e-4)
    dense, _ = judge.runner.forward(ids)
    assert torch.allclose(logprobs, dense.cpu(), atol=1e-4)


def test_reused_answer_attention_equals_eager_on_the_assembled_cache(llama):
    judge = make_judge(llama, "isolated")
    case = judge.case(PROBLEM, CANDS)
    segs = [seg for _, _, seg in judge.engine.pieces(case)]
    logprobs, attn = answer_attention(llama.model, case.prompt.suffix, past=segs)
    assert torch.allclose(attn, _eager_rows(llama.model, case.prompt.suffix, segs), atol=1e-4)
    naive = run_method(judge, case, "naive")
    assert torch.allclose(logprobs[list(case.prompt.labels)], naive.scores, atol=1e-4)


@pytest.mark.parametrize("method", ["dense", "naive"])
def test_slot_mass_plus_rest_sums_to_one_per_layer_and_head(llama, method):
    judge = make_judge(llama, "isolated")
    case = judge.case(PROBLEM, CANDS)
    attn, outcome, _ = method_attention(judge, case, method)
    mass = region_mass(attn, case.prompt)  # [L, Hq, N + 3]
    assert mass.shape[-1] == len(CANDS) + 3
    assert torch.allclose(mass.sum(-1), torch.ones(mass.shape[:2]), atol=1e-5)
    assert (mass[..., : len(CANDS)] > 0).all()
    if method == "naive":  # reuse reads its own cache: its attention is not dense's
        dense_attn, _, _ = method_attention(judge, case, "dense")
        assert (attn - dense_attn).abs().max() > 1e-4


def test_recorder_keeps_what_kvcomm_assembled(llama):
    judge = make_judge(llama, "isolated")
    agents = ["a1", "a2", "a3", "a4"]  # each candidate keeps its agent (anchor pools are per agent)
    calls = [judge.case(PROBLEM, CANDS, agents), judge.case(PROBLEM, CANDS[::-1], agents[::-1])]
    rec = _Recorder(judge.engine)
    first = judge.method("kvcomm")(rec, calls[0])  # measures anchors: answered from dense
    assert not first.reused and rec.assembled is None
    second = judge.method("kvcomm")(rec, calls[1])
    assert second.reused and rec.assembled is not None
    # the recorded cache reproduces the method's own answer
    logprobs, _ = answer_attention(llama.model, calls[1].prompt.suffix, past=rec.assembled)
    assert torch.allclose(logprobs[list(calls[1].prompt.labels)], second.scores, atol=1e-4)


@pytest.mark.parametrize("mode", ["judge_prefix", "isolated"])
def test_hybrid_k0_is_naive_and_kN_is_dense(tiny, mode):
    judge = make_judge(tiny, mode)
    case = judge.case(PROBLEM, CANDS)
    labels = list(case.prompt.labels)
    naive = run_method(judge, case, "naive").scores
    dense = run_method(judge, case, "dense").scores
    assert (naive - dense).abs().max() > 1e-4  # the two ends differ, so the checks below can fail
    assert torch.allclose(hybrid_logprobs(judge, case, [])[labels].cpu(), naive, atol=1e-4)
    assert torch.allclose(hybrid_logprobs(judge, case, range(len(CANDS)))[labels].cpu(), dense, atol=1e-4)
    mid = hybrid_logprobs(judge, case, [0, 1])[labels].cpu()
    assert (mid - dense).abs().max() > 1e-6 and (mid - naive).abs().max() > 1e-6


def test_key_deviation_is_zero_where_the_kv_is_exact(llama):
    judge = make_judge(llama, "judge_prefix")
    dev = key_deviation(judge, judge.case(PROBLEM, CANDS))
    assert dev[0] < 1e-3 and min(dev[1:]) > 1e-2  # slot 1 encoded in its real context; the others not
    iso_judge = make_judge(llama, "isolated")
    iso = key_deviation(iso_judge, iso_judge.case(PROBLEM, CANDS))
    assert iso[0] > 1e-2


def test_progressive_one_candidate_in_judge_prefix_mode_is_exact(llama):
    call = Call("t", 42, [0, 1, 2, 3], PROBLEM, CANDS, ["a1", "a2", "a3", "a4"])
    exact = jcr_by_n(progressive_rows(make_judge(llama, "judge_prefix"), [call], ["naive", "kvcomm"]),
                     ["naive", "kvcomm"])
    for m in ("naive", "kvcomm"):
        assert exact[m]["1"]["jcr"] == 1.0
        assert exact[m]["1"]["max_score_dev"] < 1e-4
    assert exact["naive"]["4"]["max_score_dev"] > 1e-4  # four candidates: reuse is not dense any more
    loose = jcr_by_n(progressive_rows(make_judge(llama, "isolated"), [call], ["naive"]), ["naive"])
    assert loose["naive"]["1"]["max_score_dev"] > 1e-4  # alone-from-0 KV is not exact even with one candidate


def _problem_onehot(n_problems: int = 30, per: int = 6, seed: int = 0):
    """Labels constant within a problem, random across problems; the only feature names the problem.
    A model may learn a problem's label only by having seen that problem."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n_problems)
    groups = np.repeat(np.arange(n_problems), per)
    X = np.eye(n_problems)[groups] + 0.01 * rng.standard_normal((len(groups), n_problems))
    return X, labels[groups], groups.astype(str)


@pytest.mark.parametrize("kind", ["logreg", "gboost"])
def test_risk_never_tests_on_a_problem_it_trained_on(kind):
    X, y, groups = _problem_onehot()
    held = grouped_heldout(X, y, groups, kind, n_splits=5)
    assert len(held.folds) == 5
    for train, test in held.folds:
        assert not set(groups[train]) & set(groups[test])
    assert sorted(np.concatenate([t for _, t in held.folds]).tolist()) == list(range(len(y)))
    auc, _ = auc_ci(y, held.proba, groups, reps=200)
    assert auc < 0.75  # nothing to learn across problems
    # the same data with a leaky split (calls of one problem on both sides) looks predictive
    leak = np.zeros(len(y))
    for train, test in KFold(5, shuffle=True, random_state=0).split(X):
        leak[test] = _classifier(kind, 0).fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    assert roc_auc_score(y, leak) > 0.9


def test_risk_finds_real_signal_on_held_out_problems():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 4).astype(str)
    signal = rng.standard_normal(len(groups))
    y = (signal + 0.3 * rng.standard_normal(len(groups)) > 0).astype(int)
    X = np.stack([signal, rng.standard_normal(len(groups))], 1)
    held = grouped_heldout(X, y, groups, "logreg")
    auc, ci = auc_ci(y, held.proba, groups, reps=200)
    assert auc > 0.85 and ci[0] < auc < ci[1] + 1e-9


def test_gate_at_precision():
    y = np.array([1, 1, 1, 0, 1, 0, 0, 1])
    p = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.4, 0.3, 0.2])
    g = gate_at_precision(y, p, 0.95)
    assert g == {"threshold": 0.7, "coverage": 3 / 8, "precision": 1.0, "jcr": 1.0}
    g80 = gate_at_precision(y, p, 0.8)  # accepting 0.6 and up: 4 of 5 consistent, one flip let through
    assert g80["coverage"] == 5 / 8 and g80["jcr"] == 7 / 8
    assert gate_at_precision(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), 0.95) is None


def _file(tmp_path, with_problem: bool = True):
    path = tmp_path / "cands.jsonl"
    lines = []
    for i, (q, cs) in enumerate([(PROBLEM, CANDS), ("Capital of France?", ["Paris", "Lyon", "paris, fr", "Rome"]),
                                 ("Is 7 prime?", ["yes", "No, 7 = 1*7", "Yes, it is prime.", "maybe"])]):
        line = {"task_id": f"t{i}", "candidates": cs, "sources": ["a1", "a2", "a3", "a4"]}
        if with_problem:
            line["problem"] = q
        lines.append(json.dumps(line))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_diagnose_writes_every_result_and_the_report(tmp_path, llama):
    out = tmp_path / "out"
    res = run_diagnose("all", _file(tmp_path), llama, ["naive"], "isolated", [42], 3, out)
    for kind in ("attention", "progressive", "hybrid", "risk"):
        assert (out / f"{kind}.json").is_file()
        for fig in res[kind]["figures"]:
            assert (out / fig).stat().st_size > 1000
    report = (out / "diagnostics.md").read_text()
    for title in ("## Attention", "## Progressive", "## Hybrid", "## Risk", "0.82", "23.60"):
        assert title in report
    assert res["hybrid"]["table"]["first"]["4"]["jcr"] == 1.0


def test_bad_input_is_one_line(tmp_path, llama):
    with pytest.raises(DiagnoseError, match=f"^{NO_AGENT_PROMPTS}$"):
        run_diagnose("attention", _file(tmp_path), llama, None, "agent", [1], None, tmp_path / "o")
    with pytest.raises(DiagnoseError, match="unknown diagnostic"):
        run_diagnose("heatmap", _file(tmp_path), llama, None, "isolated", [1], None, tmp_path / "o")
    with pytest.raises(DiagnoseError, match="no dataset"):
        run_diagnose("attention", _file(tmp_path, with_problem=False), llama, None, "isolated", [1], None,
                     tmp_path / "o")
    with pytest.raises(DiagnoseError, match="unsupported method 'dg_jkr'"):
        run_diagnose("attention", _file(tmp_path), llama, ["dg_jkr"], "isolated", [1], None, tmp_path / "o")


def test_agent_mode_rebuilds_old_files_prompts_from_the_topology(tmp_path, llama):
    calls = load_calls(_file(tmp_path), [42, 123], 2, "agent", llama.model_id, topology="progressive_refinement")
    assert len(calls) == 4 and all(c.n == 4 for c in calls)
    for call in calls:  # each shown candidate carries its own agent's prompt, shuffled with it
        assert all(isinstance(c, dict) and c["agent_prompt"] for c in call.shown)
        first = next(c for c, src in zip(call.shown, call.sources) if src == "a1")
        assert call.problem in first["agent_prompt"]
    case = make_judge(llama, "agent").case(calls[0].problem, calls[0].shown, calls[0].sources)
    assert case.candidate_kv == "agent" and case.contexts and all(case.contexts)
