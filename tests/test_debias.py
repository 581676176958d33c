"""Position-debiased judging: slot priors (PriDe, content-free), their keys, and permutation consensus."""

from __future__ import annotations

import json
import math

import pytest

from kvjudge.experiments import calibrate as C
from kvjudge.judges.debias import (PriorError, PriorKey, PriorTable, estimate_content_free, estimate_rotations,
                                   log_softmax, prior_path, priors_for, read_table, rotation)
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import known_methods
from kvjudge.judges.prompt import JudgeInputError

PROBLEM = "Which answer is right? 2 + 2 = ?"
TEXTS = ["alpha says 4", "bravo says 5", "charlie says 22", "delta says four"]
# synthetic judge: label log-prob of slot s holding candidate c = PRIOR[s] + CONTENT[c] (+ a constant)
PRIOR = log_softmax([0.0, 0.4, 1.2, 4.0])  # a last-slot preference like the measured one (97% slot 4)
CONTENT = {"a": 0.9, "b": 0.0, "c": 0.5, "d": 0.2}  # alpha is the content choice, far weaker than the prior
REUSE = ("dense", "naive", "kvcomm", "pal_kv")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVJUDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def synthetic(monkeypatch):
    """Label scores replaced by PRIOR[slot] + CONTENT[candidate] (normalised), read from each slot's text;
    everything else (prompt, KV assembly, methods, debiasing, consensus) is the real judge."""

    def scores(self, logprobs, prompt):
        import torch

        tok = self.tokenizer
        raw = [PRIOR[s] + CONTENT[tok.decode(list(ids)).strip()[0]] for s, ids in enumerate(prompt.candidates)]
        return torch.tensor(log_softmax(raw), dtype=torch.float32)

    monkeypatch.setattr(JudgeEngine, "_scores", scores)


def _items(texts=TEXTS, n_items=3):
    return [C.Item(f"t/{i}", f"{PROBLEM} (item {i})", list(texts), [f"agent{j}" for j in range(len(texts))])
            for i in range(n_items)]


def _chosen(judge, method, r, **kw):
    """The original index of the candidate ``method`` picks under rotation ``r`` of TEXTS."""
    order = rotation(len(TEXTS), r)
    v = judge.judge(PROBLEM, [TEXTS[i] for i in order], method=method, sources=[f"agent{i}" for i in order], **kw)
    return order[v.winner - 1], v


# ---------------------------------------------------------------------------- closed form
def test_rotation_estimate_equals_the_prior_of_a_hand_made_table():
    prior = [math.log(0.7), math.log(0.3)]
    a, b = 1.3, -0.4  # two candidates' content terms; rotation r puts candidate (slot + r) % 2 in a slot
    item = [[prior[0] + a, prior[1] + b], [prior[0] + b, prior[1] + a]]
    assert estimate_rotations([item]) == pytest.approx(prior, abs=1e-12)
    # a second item with other contents and a per-call constant: the same prior
    item2 = [[prior[0] + 5.0 + 2, prior[1] + 5.0], [prior[0] - 1.0, prior[1] - 1.0 + 2]]
    assert estimate_rotations([item, item2]) == pytest.approx(prior, abs=1e-12)
    with pytest.raises(PriorError, match="all 2 cyclic rotations"):
        estimate_rotations([item[:1]])


def test_content_free_estimate_is_the_normalised_mean():
    calls = [[math.log(0.5), math.log(0.25), math.log(0.25)], [math.log(0.5), math.log(0.25), math.log(0.25)]]
    assert estimate_content_free(calls) == pytest.approx([math.log(0.5), math.log(0.25), math.log(0.25)], abs=1e-12)


# ---------------------------------------------------------------------------- synthetic judge
@pytest.mark.parametrize("method", REUSE)
def test_pride_recovers_the_content_choice_under_every_rotation(llama, synthetic, method):
    judge = Judge(llama)
    table, = C.estimate(judge, _items(), [method], "pride")
    assert table.log_prior(method) == pytest.approx(PRIOR, abs=1e-5)  # the closed form recovers the prior
    C.save([table])
    raw = [_chosen(judge, method, r)[0] for r in range(4)]
    assert len(set(raw)) == 4  # none: the last slot wins, so each rotation picks another candidate
    debiased = Judge(llama, debias="pride")
    picks = [_chosen(debiased, method, r) for r in range(4)]
    assert [p for p, _ in picks] == [0, 0, 0, 0]  # position consistency 1.0: always alpha
    _, v = picks[0]
    assert v.debias == "pride"
    raw_v = _chosen(judge, method, 0)[1]
    assert v.scores == pytest.approx([s - p for s, p in zip(raw_v.scores, PRIOR)], abs=1e-5)


def test_gates_compare_debiased_winners(llama, synthetic):
    judge = Judge(llama)
    C.save(C.estimate(judge, _items(), ["dg_jkr", "random_gate"], "pride"))
    assert set(read_table(prior_path(judge.prior_key("pride", "judge_prefix", "label", 4)),
                          judge.prior_key("pride", "judge_prefix", "label", 4)).methods) == {"naive", "kvcomm", "dense"}
    debiased = Judge(llama, debias="pride")
    for r in range(4):
        pick, v = _chosen(debiased, "dg_jkr", r)
        assert pick == 0 and v.gate == "accepted"  # both arms read alpha once their priors are removed
        assert _chosen(debiased, "random_gate", r)[0] == 0


def test_permutation_consensus(llama, synthetic):
    judge = Judge(llama)
    C.save(C.estimate(judge, _items(), ["dense", "naive"], "pride"))
    for method in ("dense", "naive"):
        # all N rotations: every candidate visits every slot, so the raw sum is already position-free
        pick, v = _chosen(judge, method, 1, permutations=4)
        assert pick == 0 and v.consensus["consistent"] is False  # rotations disagree, the sum does not
        assert v.consensus["permutations"] == 4 and len(v.consensus["winners"]) == 4
        # two rotations debiased: each already picks alpha
        pick, v = _chosen(judge, method, 2, permutations=2, debias="pride")
        assert pick == 0 and v.consensus["consistent"] is True and v.consensus["agreement"] == 1.0
    dense = _chosen(judge, "dense", 0, permutations=3)[1]
    naive = _chosen(judge, "naive", 0, permutations=3)[1]
    assert dense.consensus["cost_x_dense"] == pytest.approx(3.0)  # three dense prefills
    prompt = judge.case(PROBLEM, TEXTS).prompt  # three suffix prefills on re-indexed KV, not three dense ones
    assert naive.consensus["cost_x_dense"] == pytest.approx(3 * len(prompt.suffix) / len(prompt.ids()))
    single = _chosen(judge, "naive", 0)[1]
    assert naive.prefilled_tokens == 3 * single.prefilled_tokens


# ---------------------------------------------------------------------------- keys
def test_priors_are_keyed_and_never_used_for_another_key(llama, synthetic, tmp_path):
    judge = Judge(llama)
    C.save(C.estimate(judge, _items(), ["dense"], "pride"))
    key = judge.prior_key("pride", "judge_prefix", "label", 4)
    table = read_table(prior_path(key), key)
    assert table.log_prior("dense") == pytest.approx(PRIOR, abs=1e-5)
    others = [PriorKey("other-model", *list(key.__dict__.values())[1:]),
              PriorKey(key.model_id, key.kind, key.candidate_kv, key.output, 3, key.template),
              PriorKey(key.model_id, key.kind, key.candidate_kv, key.output, key.n, "0123456789ab"),
              PriorKey(key.model_id, "content_free", key.candidate_kv, key.output, key.n, key.template)]
    for other in others:
        with pytest.raises(PriorError, match="is for") as err:
            read_table(prior_path(key), other)  # the file of one key read as another's
        assert "\n" not in str(err.value)
        assert not prior_path(other).exists()
    with pytest.raises(PriorError, match="kvjudge calibrate") as err:
        priors_for(others[0], ["dense"], None)
    assert "\n" not in str(err.value)
    debiased = Judge(llama, debias="pride")
    with pytest.raises(JudgeInputError, match="judge method naive.*kvjudge calibrate"):
        debiased.judge(PROBLEM, TEXTS, method="naive")  # a method without its own prior
    with pytest.raises(JudgeInputError, match="N=3.*kvjudge calibrate"):
        debiased.judge(PROBLEM, TEXTS[:3], method="dense")  # another N
    with pytest.raises(JudgeInputError, match="kvjudge calibrate"):
        debiased.judge(PROBLEM, TEXTS, method="dense", candidate_kv="isolated")  # another candidate-KV mode
    assert debiased.judge(PROBLEM, TEXTS, method="dense").debias == "pride"
    with pytest.raises(PriorError, match="version"):
        path = prior_path(key)
        path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
        read_table(path, key)


# ---------------------------------------------------------------------------- real tiny model
@pytest.mark.parametrize("method", known_methods())
def test_content_free_one_candidate_every_method_equals_dense(llama, method):
    judge = Judge(llama)
    C.save(C.estimate(judge, _items(TEXTS[:1], 2), [method], "content_free"))
    key = judge.prior_key("content_free", "judge_prefix", "label", 1)
    assert all(e["log_prior"] == [0.0] for e in read_table(prior_path(key), key).methods.values())
    debiased = Judge(llama, debias="content_free")
    dense = judge.judge(PROBLEM, TEXTS[:1], method="dense")
    for _ in range(2):
        v = debiased.judge(PROBLEM, TEXTS[:1], method=method)
        assert v.winner == 1 and v.scores == pytest.approx(dense.scores, abs=1e-4)


def test_real_model_debiased_scores_are_raw_minus_the_saved_prior(llama):
    judge = Judge(llama)
    tables = C.estimate(judge, _items(TEXTS[:3], 2), ["dense", "naive"], "pride")
    paths = C.save(tables)
    assert "slot 3" in C.render(tables, paths) and paths[0].is_file()
    prior = tables[0].log_prior("naive")
    assert sum(math.exp(p) for p in prior) == pytest.approx(1.0)
    raw = judge.judge(PROBLEM, TEXTS[:3], method="naive")
    v = Judge(llama, debias="pride").judge(PROBLEM, TEXTS[:3], method="naive")
    assert v.scores == pytest.approx([s - p for s, p in zip(raw.scores, prior)], abs=1e-5)
    cf = C.estimate(judge, _items(TEXTS[:3], 1), ["dense"], "content_free")[0].log_prior("dense")
    assert sum(math.exp(p) for p in cf) == pytest.approx(1.0) and cf != pytest.approx(prior, abs=1e-3)


def test_generate_output_pride_is_the_rotation_vote(llama):
    judge = Judge(llama, output="generate", max_new_tokens=4, debias="pride")
    v = judge.judge(PROBLEM, TEXTS[:3], method="naive")
    assert v.consensus["permutations"] == 3 and v.debias == "pride" and v.scores == []
    votes = [w for w in v.consensus["winners"] if w is not None]
    assert v.winner is None if not votes else votes.count(v.winner) == max(votes.count(w) for w in votes)
    with pytest.raises(JudgeInputError, match="content_free needs label output"):
        Judge(llama, output="generate", debias="content_free")
    with pytest.raises(PriorError, match="label output"):
        C.estimate(judge, _items(TEXTS[:2], 1), ["dense"])


def test_cli_calibrate_then_judge(llama, tmp_path, capsys, monkeypatch):
    from kvjudge.app.cli import main

    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps({"task_id": f"x/{i}", "problem": PROBLEM, "candidates": TEXTS[:2],
                                         "sources": ["a", "b"]}) + "\n" for i in range(2)))
    args = ["--model", "tiny-llama", "--device", "cpu"]
    assert main(["judge", *args, "--problem", PROBLEM, "--candidate", "x", "--candidate", "y",
                 "--judge-debias", "pride"]) == 2
    err = capsys.readouterr().err
    assert "kvjudge calibrate" in err and len(err.strip().splitlines()) == 1
    assert "--model tiny-llama --candidates" in err  # the alias it was loaded as: the command runs as printed
    assert main(["calibrate", *args, "--candidates", str(cands), "--methods", "naive",
                 "--candidate-kv", "judge_prefix"]) == 0
    out = capsys.readouterr().out
    saved = json.loads(next((tmp_path / "cache" / "priors").rglob("*.json")).read_text())
    assert "model_arg" not in saved["key"] and saved["key"]["model_id"].startswith("tiny-llama@")
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert "priors" in out and ".json" in out and rows == ["naive", "dense"]  # dense: what every method may answer with
    assert main(["judge", *args, "--method", "naive", "--problem", PROBLEM, "--candidate", "x", "--candidate",
                 "y", "--judge-debias", "pride", "--judge-permutations", "2", "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["debias"] == "pride" and verdict["consensus"]["permutations"] == 2


def test_eval_calibrates_on_the_first_problems_and_leaves_them_out(tmp_path):
    from kvjudge.experiments.config import EvalConfig
    from kvjudge.experiments.protocol import evaluate

    gsm = [("What is 2 + 3?", 5), ("What is 10 - 4?", 6), ("What is 3 * 3?", 9), ("What is 8 / 2?", 4)]
    data, cands = tmp_path / "gsm.jsonl", tmp_path / "cands.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"step\n#### {a}"}) + "\n" for q, a in gsm))
    cands.write_text("".join(json.dumps({"task_id": f"gsm8k/{i}", "sources": ["a1", "a2", "a3"],
                                         "candidates": [f"The answer is {a + d}." for d in (0, 1, -1)]}) + "\n"
                             for i, (_, a) in enumerate(gsm)))
    cfg = EvalConfig(dataset="gsm8k", out=tmp_path / "out", model="tiny-llama", methods="dense,naive", seeds="42",
                     candidates=cands, data=str(data), candidate_kv="judge_prefix", judge_debias="pride",
                     calibrate_on=2)
    summary = evaluate(cfg, progress=False, verbose=False)
    cal = summary["config"]["calibration"]
    assert cal["kind"] == "pride" and cal["problems"] == ["gsm8k/0", "gsm8k/1"]
    assert set(cal["priors"]["3"]) == {"dense", "naive"}
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {r["task_id"] for r in records} == {"gsm8k/2", "gsm8k/3"}  # the calibration split is not scored
    assert all(r["debias"] == "pride" for r in records)
    with pytest.raises(ValueError, match="calibrate-on"):
        EvalConfig(dataset="gsm8k", out=tmp_path / "x", calibrate_on=2)  # a split without a debias mode


def test_calibrate_reports_progress_and_hands_over_each_method_as_it_completes(llama, synthetic):
    """estimate() reports items as it goes and calls on_method once per finished method, with that
    method's prior already in the table (the CLI saves it then: an interrupt keeps finished methods)."""
    judge = Judge(llama)
    lines, seen = [], []
    C.estimate(judge, _items(), ["dense", "naive"], "pride", progress=lines.append,
               on_method=lambda t: seen.append(sorted(t.methods)))
    assert seen == [["dense"], ["dense", "naive"]]
    assert any(line.endswith(f"{len(_items())}/{len(_items())} items") for line in lines)


# ---------------------------------------------------------------------------- one prior per method setting
def test_prior_names_carry_every_option_off_its_default():
    from kvjudge.judges.debias import needed_methods, prior_name, split_prior_name
    from kvjudge.judges.methods import make_method

    assert prior_name(make_method("partial")) == prior_name(make_method("partial", recompute_first=16)) == "partial"
    assert prior_name(make_method("partial", recompute_first=32)) == "partial[recompute_first=32]"
    assert prior_name(make_method("partial", blend=0.15)) == "partial[blend=0.15]"
    assert prior_name(make_method("kvcomm", pool_by="all")) == "kvcomm[pool_by=all]"
    assert prior_name(make_method("pal_kv")) == "pal_kv"  # its own default (pool by all)
    gate = make_method("selective", cheap="partial:recompute_first=4", score="margin", gate=0.0)
    assert needed_methods("selective", gate) == ["partial[recompute_first=4]", "dense"]
    assert split_prior_name("partial[recompute_first=32,blend=0.15]") == ("partial", {"recompute_first": "32",
                                                                                       "blend": "0.15"})


def test_a_method_setting_never_uses_the_prior_of_another(llama, synthetic):
    """A prior estimated for partial at its defaults (K=16) is not used for partial K=4 (one line naming the
    calibrate command with its --method-option); calibrating K=4 gives it its own entry, which debiases it."""
    judge = Judge(llama)
    C.save(C.estimate(judge, _items(), ["partial"], "pride"))
    other = Judge(llama, method="partial", method_options={"recompute_first": 4}, debias="pride")
    with pytest.raises(PriorError, match=r"partial\[recompute_first=4\].*--methods partial "
                                         r"--method-option partial.recompute_first=4"):
        other.judge(PROBLEM, TEXTS, method="partial")
    judge.method("partial", recompute_first=4)
    tables = C.estimate(judge, _items(), ["partial"], "pride")
    assert sorted(tables[0].methods) == ["dense", "partial[recompute_first=4]"]
    C.save(tables)
    other.reload_priors()
    table = other.prior_table(other.prior_key("pride", "judge_prefix", "label", len(TEXTS)))
    assert sorted(table.methods) == ["dense", "partial", "partial[recompute_first=4]"]  # merged, both kept
    raw = judge.judge(PROBLEM, TEXTS, method="partial", debias="none")
    v = other.judge(PROBLEM, TEXTS, method="partial")
    prior = table.log_prior("partial[recompute_first=4]")
    assert v.debias == "pride" and v.scores == pytest.approx([s - p for s, p in zip(raw.scores, prior)], abs=1e-5)


def test_calibrate_estimates_a_gates_configured_cheap_path(llama, synthetic):
    """A gate stands for the methods it runs, as configured: selective on partial K=4 needs that setting's prior."""
    judge = Judge(llama)
    judge.method("selective", cheap="partial:recompute_first=4", score="margin", gate=0.0)
    tables = C.estimate(judge, _items(), ["selective"], "pride")
    assert sorted(tables[0].methods) == ["dense", "partial[recompute_first=4]"]
    assert "partial" not in judge._methods  # judged through the gate's own instance, adopted under its prior name


def test_cli_calibrate_takes_method_options(llama, tmp_path, capsys):
    from kvjudge.app.cli import main

    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps({"task_id": f"x/{i}", "problem": PROBLEM, "candidates": TEXTS[:2],
                                         "sources": ["a", "b"]}) + "\n" for i in range(2)))
    args = ["--model", "tiny-llama", "--device", "cpu", "--candidates", str(cands), "--candidate-kv", "judge_prefix"]
    assert main(["calibrate", *args, "--methods", "naive", "--method-option", "partial.recompute_first=2"]) == 2
    assert "partial is not judged here (--methods naive)" in capsys.readouterr().err
    assert main(["calibrate", *args, "--methods", "partial", "--method-option", "partial.recompute_first=2"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert rows == ["partial[recompute_first=2]", "dense"]
