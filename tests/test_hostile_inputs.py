"""Hostile inputs, round two: every attack ends in one line on stderr and exit 2 (or the correct
result), before any work is lost; folders keep one configuration; SIGTERM ends a run like Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from kvjudge.app.cli import main, read_text
from kvjudge.experiments.candidates import load_candidates
from kvjudge.experiments.config import EvalConfig
from kvjudge.experiments.data import DataError, iter_jsonl
from kvjudge.experiments.datasets import DATASETS, load_dataset, load_problems
from kvjudge.experiments.plots import write_plots
from kvjudge.experiments.protocol import evaluate
from kvjudge.judges.judge import Judge
from kvjudge.judges.prompt import JudgeInputError
from kvjudge.topologies import load_topology, load_topology_text, resolve_topology
from kvjudge.runtime.manifest import MANIFEST, run_manifest
from kvjudge.runtime.results import ResultsError, ResultsLog
from kvjudge.runtime.runner import RunError, check_machine, run


def _cli(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvjudge.app.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err


def _main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- text: invalid UTF-8, lone surrogates
def test_at_file_with_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path):
    data = "café ok ".encode() + b"\xff\xfe rest"
    (tmp_path / "bad.txt").write_bytes(data)
    proc = _cli("judge", "--model", "tiny-llama", "--problem", f"@{tmp_path / 'bad.txt'}", "--candidate", "x")
    at = data.index(0xFF)
    _one_line(proc.returncode, proc.stderr, f"bad.txt': not UTF-8 text (byte 0xff at byte offset {at})")


def test_candidate_with_a_lone_surrogate_is_one_line(capsys):
    code, err = _main(capsys, "judge", "--model", "tiny-llama", "--problem", "p", "--candidate", "ok",
                      "--candidate", "bad \ud800")
    _one_line(code, err, "--candidate 2: not valid text")


def test_undecodable_argv_bytes_are_one_line(tmp_path):
    # Python turns undecodable command-line bytes into lone surrogates
    proc = subprocess.run([sys.executable.encode(), b"-m", b"kvjudge.app.cli", b"judge", b"--model", b"tiny-llama",
                           b"--problem", b"p", b"--candidate", b"a\xffb"], capture_output=True, timeout=120)
    _one_line(proc.returncode, proc.stderr.decode(), "--candidate 1: not valid text")


def test_jsonl_files_are_decoded_strictly(tmp_path):
    good = json.dumps({"id": "a", "prompt": "fine"}).encode() + b"\n"
    bad = b'{"id": "b", "prompt": "caf\xe9"}\n'  # Latin-1, not UTF-8
    (tmp_path / "p.jsonl").write_bytes(good + bad)
    at = len(good) + bad.index(0xE9)
    with pytest.raises(DataError, match=rf"p.jsonl:2: not UTF-8 text \(byte 0xe9 at byte offset {at}\)"):
        load_problems(str(tmp_path / "p.jsonl"))
    # a JSON "\ud800" escape is valid JSON but no text: refused in problems and candidates files alike
    _jsonl(tmp_path / "s.jsonl", ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "bad \\ud800"}'])
    with pytest.raises(DataError, match=r"s.jsonl:2: a string holds a lone surrogate"):
        load_problems(str(tmp_path / "s.jsonl"))
    _jsonl(tmp_path / "c.jsonl", ['{"task_id": "t", "candidates": ["ok", "bad \\udfff"]}'])
    with pytest.raises(DataError, match=r"c.jsonl:1: a string holds a lone surrogate"):
        load_candidates(tmp_path / "c.jsonl")
    # a surrogate *pair* is a real character and stays
    _jsonl(tmp_path / "e.jsonl", ['{"id": "a", "prompt": "smile \\ud83d\\ude00"}'])
    assert [p["prompt"] for _, p in iter_jsonl(tmp_path / "e.jsonl")] == ["smile \U0001F600"]


def test_read_text_gives_back_valid_utf8(tmp_path):
    (tmp_path / "ok.txt").write_text("naïve — ok", encoding="utf-8")
    assert read_text(f"@{tmp_path / 'ok.txt'}") == "naïve — ok"


# ---------------------------------------------------------------- devices, numbers
@pytest.mark.parametrize("device, needle", [
    ("foo", "--device 'foo' is not a torch device"),
    ("cuda:99", "--device cuda:99"),
    ("meta", "only cpu, cuda and mps devices"),
])
def test_bad_devices_are_one_line(capsys, device, needle):
    code, err = _main(capsys, "judge", "--model", "tiny-llama", "--problem", "p", "--candidate", "x", "--device",
                      device)
    _one_line(code, err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    for argv in (["judge", "--model", "tiny-llama", "--problem", "p", "--candidate", "x"],
                 ["eval", "gsm8k", "--model", "tiny-llama", "--limit", "1"]):
        code, err = _main(capsys, *argv, "--device", "cuda")
        _one_line(code, err, "no CUDA device")


@pytest.mark.parametrize("value", ["0", "-3", "4097", "100000"])
@pytest.mark.parametrize("command", [
    ["judge", "--model", "tiny-llama", "--problem", "p", "--candidate", "x", "--judge-output", "generate"],
    ["run", "progressive_refinement", "--model", "tiny-llama", "--limit", "1", "--no-dashboard"],
    ["eval", "gsm8k", "--model", "tiny-llama", "--limit", "1", "--judge-output", "generate"],
])
def test_judge_max_tokens_is_bounded_like_the_topology(capsys, tmp_path, command, value):
    code, err = _main(capsys, *command, "--out", str(tmp_path / "o"), "--judge-max-tokens", value) \
        if command[0] != "judge" else _main(capsys, *command, "--judge-max-tokens", value)
    _one_line(code, err, f"--judge-max-tokens must be in 1..4096, got {value}")
    assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.parametrize("argv, needle", [
    (["run", "progressive_refinement", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["eval", "gsm8k", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["diagnose", "risk", "--candidates", "x.jsonl", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["bench", "run", "progressive_refinement", "--limit", "-1"], "--limit must be >= 1, got -1"),
    (["run", "progressive_refinement", "--replicas", "10000"], "--replicas must be in 1..256 or auto, got 10000"),
    (["run", "progressive_refinement", "--replicas", "0"], "--replicas must be in 1..256 or auto, got 0"),
    (["eval", "gsm8k", "--judge-permutations", "0"], "--judge-permutations must be >= 1, got 0"),
    (["judge", "--problem", "p", "--candidate", "a", "--judge-permutations", "0"], "--judge-permutations must be >= 1, got 0"),
    (["bench", "judge", "--judge-permutations", "0"], "--judge-permutations must be >= 1, got 0"),
    # an option no judged method reads would be silently ignored: refused instead
    (["judge", "--problem", "p", "--candidate", "a", "--method", "naive", "--method-option", "partial.recompute_first=3"],
     "partial is not judged here (--method naive)"),
    (["eval", "gsm8k", "--methods", "dense,naive", "--method-option", "partial.blend=0.2"],
     "partial is not judged here (--methods dense,naive)"),
    (["bench", "judge", "--methods", "naive", "--method-option", "partial.recompute_first=3"],
     "partial is not judged here (--methods naive)"),
])
def test_numbers_out_of_bounds_are_one_line(capsys, argv, needle):
    code, err = _main(capsys, *argv)
    _one_line(code, err, needle)


def test_replicas_are_checked_against_the_real_cores_of_an_embedded_ray(capsys, tmp_path):
    cores = os.cpu_count() or 1
    check_machine(cores, ["tiny-llama"], 1.0)  # one a core fits
    with pytest.raises(RunError, match=rf"do not fit this machine's {cores} CPU\(s\).*at most {cores} per model"):
        check_machine(cores + 1, ["tiny-llama"], 1.0)
    with pytest.raises(RunError, match=rf"at most {max(1, cores // 2)} per model"):
        check_machine(cores + 1, ["tiny-llama", "tiny-qwen2"], 1.0)
    check_machine(4 * cores, ["sim:tokens_per_s=50"], 1.0)  # simulated agents sleep: four a core
    assert not ray.is_initialized()
    # end to end: refused in one line before any Ray starts (the embedded Ray would get that many logical CPUs)
    t0 = time.time()
    code, err = _main(capsys, "run", "progressive_refinement", "--model", "tiny-llama", "--limit", "1",
                      "--replicas", "256", "--out", str(tmp_path / "o"), "--no-dashboard")
    _one_line(code, err, "do not fit this machine's")
    assert time.time() - t0 < 60 and not ray.is_initialized()


# ---------------------------------------------------------------- token ids, context
@pytest.fixture(scope="module")
def judge(llama):
    return Judge(llama, candidate_kv="agent")


def test_token_ids_outside_the_vocabulary_or_negative(judge):
    vocab = judge.lm.model.get_input_embeddings().num_embeddings
    ok = {"text": "abc", "token_ids": list(judge.lm.tokenizer("abc", add_special_tokens=False)["input_ids"]),
          "agent_prompt": "q"}
    judge.case("p", [ok, ok])  # consistent ids pass
    for bad_id in (vocab, vocab + 1000, -1):
        bad = {**ok, "token_ids": ok["token_ids"][:-1] + [bad_id]}
        with pytest.raises(JudgeInputError, match=rf"candidate 2: token_ids holds id {bad_id}, outside the model's "
                                                  rf"vocabulary 0..{vocab - 1}"):
            judge.case("p", [ok, bad])
    with pytest.raises(JudgeInputError, match="candidate 1: prompt_ids holds id -5"):
        judge.case("p", [{**ok, "prompt_ids": [1, -5]}, ok])


def test_token_ids_must_decode_to_the_candidates_text(judge):
    tok = judge.lm.tokenizer
    other = list(tok("xyz", add_special_tokens=False)["input_ids"])
    assert tok.decode(other, skip_special_tokens=True).strip() != "abc"
    with pytest.raises(JudgeInputError, match="candidate 1: token_ids do not decode to its text"):
        judge.case("p", [{"text": "abc", "token_ids": other, "agent_prompt": "q"}])


def test_token_ids_may_not_pad_or_slip_tokens_into_the_text(judge):
    """ids that decode (special tokens skipped, ends stripped) to the text but make the judge read more:
    whitespace padding past ID_PADDING, a special token inside the answer; a trailing end-of-text mark
    and the agents' own 0-2 trailing newlines pass."""
    from kvjudge.judges.judge import ID_PADDING

    tok = judge.lm.tokenizer
    ids = list(tok("abc def", add_special_tokens=False)["input_ids"])
    nl = list(tok("\n", add_special_tokens=False)["input_ids"])
    special = sorted(set(tok.all_special_ids))[0]
    cand = lambda token_ids: {"text": "abc def", "token_ids": token_ids, "agent_prompt": "q"}  # noqa: E731
    judge.case("p", [cand(ids + nl * 2), cand(ids + [special])])
    padded = ids + nl * (ID_PADDING + 1)
    assert tok.decode(padded, skip_special_tokens=True).strip() == "abc def"  # the old rule let it pass
    with pytest.raises(JudgeInputError, match=rf"candidate 1: token_ids pad its text with {ID_PADDING + 1} "
                                              rf"characters of whitespace \(at most {ID_PADDING}\)"):
        judge.case("p", [cand(padded)])
    inside = ids[:1] + [special] * 5 + ids[1:]
    assert tok.decode(inside, skip_special_tokens=True).strip() == "abc def"
    with pytest.raises(JudgeInputError, match="candidate 2: token_ids hold a special token inside the answer"):
        judge.case("p", [cand(ids), cand(inside)])


def test_agent_prompt_longer_than_the_context_names_the_sizes(judge, tmp_path, capsys):
    limit = judge.engine.max_positions
    long = "w" * (limit + 10)
    with pytest.raises(JudgeInputError, match=rf"candidate 1: its agent prompt \(\d+ tokens\) and answer \(\d+ "
                                              rf"tokens\) take \d+ positions, more than the model's {limit}"):
        judge.case("p", [{"text": "abc", "agent_prompt": long}])
    (tmp_path / "p.txt").write_text(long)
    code, err = _main(capsys, "judge", "--model", "tiny-llama", "--problem", "p", "--candidate", "a", "--candidate",
                      "b", "--candidate-kv", "agent", "--agent-prompt", f"@{tmp_path / 'p.txt'}")
    _one_line(code, err, f"more than the model's {limit}")
    # the problem alone: the assembled judge prompt is checked too, with its size
    code, err = _main(capsys, "judge", "--model", "tiny-llama", "--problem", f"@{tmp_path / 'p.txt'}",
                      "--candidate", "a")
    _one_line(code, err, f"more than the model's {limit} positions")


def test_candidates_file_token_ids_must_be_non_negative_integers(tmp_path):
    for ids in ([[1, -2]], [[1, 2.5]], [[True]], [["7"]]):
        _jsonl(tmp_path / "c.jsonl", [{"task_id": "t", "candidates": ["a"], "token_ids": ids}])
        with pytest.raises(ValueError, match=r"c.jsonl:1: \"token_ids\" must hold lists of token ids"):
            load_candidates(tmp_path / "c.jsonl")


# ---------------------------------------------------------------- dataset rows, for every dataset alike
def _good_row(name: str) -> dict:
    return {"humaneval": {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "  return 1\n",
                          "test": "def check(c):\n  assert c() == 1\n", "entry_point": "f"},
            "gsm8k": {"question": "1+1?", "answer": "so\n#### 2"},
            "mmlu": {"question": "q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                     "correct_answer": "B"}}[name]


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_validates_its_rows(tmp_path, name):
    ds = DATASETS[name]
    good = _good_row(name)
    assert set(ds.fields) <= set(good)
    path = _jsonl(tmp_path / "d.jsonl", [good])
    assert len(load_dataset(name, path=str(path))) == 1
    _jsonl(path, [good, ["not", "an", "object"]])
    with pytest.raises(DataError, match=rf"d.jsonl:2: a {name} row must be a JSON object, not list"):
        load_dataset(name, path=str(path))
    for field in ds.fields:
        _jsonl(path, [good, {k: v for k, v in good.items() if k != field}])
        with pytest.raises(DataError, match=rf"d.jsonl:2: {name} row without field '{field}'"):
            load_dataset(name, path=str(path))
        _jsonl(path, [{**good, field: None}])
        with pytest.raises(DataError, match=rf"d.jsonl:1: {name} field '{field}' must be"):
            load_dataset(name, path=str(path))


def test_eval_humaneval_data_row_without_test_is_one_line(tmp_path):
    good = _good_row("humaneval")
    path = _jsonl(tmp_path / "he.jsonl", [good, {k: v for k, v in good.items() if k != "test"}])
    proc = _cli("eval", "humaneval", "--model", "tiny-llama", "--data", str(path), "--out", str(tmp_path / "o"),
                "--unsafe-exec")
    _one_line(proc.returncode, proc.stderr, "he.jsonl:2: humaneval row without field 'test'")


# ---------------------------------------------------------------- problem ids
def test_duplicate_and_ambiguous_problem_ids_name_the_line(tmp_path):
    p = tmp_path / "p.jsonl"
    _jsonl(p, [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(DataError, match=r"p.jsonl:2: id \"a\" repeats line 1"):
        load_problems(str(p))
    _jsonl(p, [{"id": 1, "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "1", "prompt": "z"}])
    with pytest.raises(DataError, match=r"p.jsonl:3: id \"1\" repeats line 1 \(written 1 there: ids are strings\)"):
        load_problems(str(p))
    for bad in (1.5, None, True, [1], ""):
        _jsonl(p, [{"id": bad, "prompt": "x"}])
        with pytest.raises(DataError, match=r"p.jsonl:1: an id must be a non-empty string or an integer"):
            load_problems(str(p))
    # consistent integers are fine, and become strings
    _jsonl(p, [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "y"}])
    assert [q["id"] for q in load_problems(str(p))] == ["1", "2"]


def test_duplicate_task_ids_in_candidates_and_data_files(tmp_path):
    c = _jsonl(tmp_path / "c.jsonl", [{"task_id": "t1", "candidates": ["a"]}, {"task_id": "t2", "candidates": ["b"]},
                                      {"task_id": "t1", "candidates": ["c"]}])
    with pytest.raises(DataError, match=r"c.jsonl:3: task_id \"t1\" repeats line 1"):
        load_candidates(c)
    good = _good_row("humaneval")
    d = _jsonl(tmp_path / "he.jsonl", [good, {**good, "prompt": "other"}])
    with pytest.raises(DataError, match=r"he.jsonl:2: task_id \"T/0\" repeats line 1"):
        load_dataset("humaneval", path=str(d))


GSM = [("What is 2 + 3?", 5), ("What is 10 - 4?", 6), ("What is 3 * 3?", 9)]


@pytest.fixture()
def gsm(tmp_path):
    data = _jsonl(tmp_path / "gsm.jsonl", [{"question": q, "answer": f"s\n#### {a}"} for q, a in GSM])
    rows = [{"task_id": f"gsm8k/{i}", "candidates": [f"The answer is {a + d}." for d in (0, 1)]}
            for i, (_, a) in enumerate(GSM)]
    return tmp_path, data, rows


def _eval_cfg(root: Path, data: Path, cands: Path, **kw) -> EvalConfig:
    opts = dict(dataset="gsm8k", out=root / "out", model="tiny-llama", methods="dense,naive", seeds="42",
                candidates=cands, data=str(data), candidate_kv="judge_prefix")
    return EvalConfig(**{**opts, **kw})


def test_unknown_task_ids_in_a_candidates_file_are_an_error(gsm):
    root, data, rows = gsm
    for wrong in ("gsm8k/9999", "GSM8K/1"):
        cands = _jsonl(root / "c.jsonl", [*rows, {"task_id": wrong, "candidates": ["x", "y"]}])
        with pytest.raises(ValueError, match=rf"c.jsonl:4: task_id '{wrong}' is not a gsm8k problem \(its ids look "
                                             r"like 'gsm8k/0'\)"):
            evaluate(_eval_cfg(root, data, cands, out=root / wrong.replace("/", "_")), verbose=False)


# ---------------------------------------------------------------- one folder, one configuration
def test_eval_resume_with_other_candidates_is_refused_and_keeps_everything(gsm):
    root, data, rows = gsm
    a = _jsonl(root / "a.jsonl", rows)
    b = _jsonl(root / "b.jsonl", [{**r, "candidates": list(reversed(r["candidates"]))} for r in rows])
    first = evaluate(_eval_cfg(root, data, a), verbose=False)
    out = root / "out"
    kept = {n: (out / n).read_bytes() for n in ("results.jsonl", "candidates.jsonl", MANIFEST)}
    with pytest.raises(ResultsError, match=r"holds results of another configuration: candidates was 'sha256:"):
        evaluate(_eval_cfg(root, data, b, resume=True), verbose=False)
    with pytest.raises(ResultsError, match=r"another configuration: candidate_kv was 'judge_prefix', now 'isolated'"):
        evaluate(_eval_cfg(root, data, a, resume=True, candidate_kv="isolated"), verbose=False)
    assert {n: (out / n).read_bytes() for n in kept} == kept
    # the same configuration resumes (more seeds may be added)
    again = evaluate(_eval_cfg(root, data, a, resume=True, seeds="42,123"), verbose=False)
    assert again["methods"]["dense"]["n"] == 2 * first["methods"]["dense"]["n"]


SMALL = """
name: {name}
defaults: {{model: "sim:tokens_per_s=400,answer_tokens=4", max_new_tokens: 8}}
agents:
  a: {{role: solver, prompt: "Solve: {{problem}}"}}
  b: {{role: refiner, prompt: "Improve: {{previous}} for {{problem}}"}}
edges: [{{source: a, target: b}}]
judge: {{method: naive}}
"""


def _seed_folder(out: Path, topo, records: list[dict], model: str | None = None, source: str | None = None) -> None:
    from kvjudge.runtime.manifest import check_manifest

    check_manifest(out, run_manifest(topo, model, source), False)
    with ResultsLog(out / "results.jsonl") as log:
        for r in records:
            log.append(r)


def test_run_resume_into_another_topologys_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    debate = load_topology(resolve_topology("debate"))
    _seed_folder(out, debate, [{"id": "p1", "status": "ok"}], model="tiny-llama", source="humaneval")
    before = (out / "results.jsonl").read_bytes()
    code, err = _main(capsys, "run", "progressive_refinement", "--model", "tiny-llama", "--problems", "humaneval",
                      "--limit", "3", "--out", str(out), "--resume", "--no-dashboard")
    _one_line(code, err, "holds results of another configuration: topology was 'debate', now 'progressive_refinement'")
    for flag, field in ((["--model", "tiny-qwen2"], "model was 'tiny-llama'"),
                        (["--model", "tiny-llama", "--judge-output", "generate"], "output was 'label'"),
                        (["--model", "tiny-llama", "--problems", "gsm8k"], "problems was 'humaneval'")):
        code, err = _main(capsys, "run", "debate", "--limit", "3", "--out", str(out), "--resume", "--no-dashboard",
                          *flag)
        _one_line(code, err, field)
    assert (out / "results.jsonl").read_bytes() == before


@pytest.fixture(scope="module")
def sim_ray():
    ray.init(address="local", num_cpus=4, namespace="kvjudge", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "0"}})
    yield
    ray.shutdown()


class _Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None


def test_resume_retries_failed_problems_and_counts_each_id_once(sim_ray, tmp_path):
    topo = load_topology_text(SMALL.format(name="small"))
    problems = [{"id": f"p{i}", "prompt": f"What is {i} + 1?"} for i in range(3)]
    _seed_folder(tmp_path, topo, [{"id": "p0", "status": "ok", "candidates": []},
                                  {"id": "p1", "status": "failed", "error": "RayActorError: died twice"}],
                 source="file:x")
    counts = run(topo, problems, tmp_path, reporter=_Quiet(), resume=True, source="file:x")
    assert (counts["done"], counts["failed"], counts["skipped"], counts["retried"]) == (2, 0, 1, 1)
    assert (counts["ok_total"], counts["failed_total"]) == (3, 0)
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines[:2]] == ["p0", "p1"] and lines[1]["status"] == "failed"  # append-only
    latest = {r["id"]: r["status"] for r in lines}  # the latest record of each id wins
    assert latest == {"p0": "ok", "p1": "ok", "p2": "ok"} and len(lines) == 4
    # nothing failed now: a second resume runs nothing and counts each problem once
    again = run(topo, problems, tmp_path, reporter=_Quiet(), resume=True, source="file:x")
    assert (again["done"], again["skipped"], again["ok_total"], again["failed_total"]) == (0, 3, 3, 0)


# ---------------------------------------------------------------- generated output, undefined JCR
def test_undefined_jcr_is_plotted_and_reported_as_n_a(tmp_path):
    row = {"n": 4, "jcr": None, "jcr_ci": None, "coverage": None, "reuse_rate": 1.0, "latency_ratio": None,
           "pass_at_1": 0.5}
    summary = {"config": {"dataset": "gsm8k", "model": "m"},
               "methods": {"dense": {**row, "jcr": 1.0, "jcr_ci": [1.0, 1.0], "reuse_rate": 0.0,
                                     "latency_ratio": 1.0}, "naive": row}}
    paths = write_plots(summary, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_eval_generate_output_never_crashes_after_writing_records(gsm):
    """The tiny random judge's one-token answers name no candidate: JCR is undefined, and eval still
    writes its summary, report and plots."""
    root, data, rows = gsm
    cands = _jsonl(root / "c.jsonl", rows)
    cfg = _eval_cfg(root, data, cands, judge_output="generate", judge_max_tokens=1)
    summary = evaluate(cfg, verbose=False)
    for name in ("summary.json", "report.md", "jcr_vs_coverage.png", "latency_ratio.png"):
        assert (cfg.out / name).stat().st_size > 0
    naive = summary["methods"]["naive"]
    assert naive["jcr"] is None or 0.0 <= naive["jcr"] <= 1.0


# ---------------------------------------------------------------- SIGTERM, end to end
def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _gone(procs: list[psutil.Process], timeout: float = 30.0) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path):
    """SIGTERM once a problem is on disk: exit 143, one note, no native stack dump, the finished
    problems kept, Ray's processes gone; the run then resumes."""
    probs = _jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Name {i} colours."} for i in range(30)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvjudge.app.cli", "run", "progressive_refinement", "--model", "tiny-llama",
         "--problems", str(probs), "--out", str(out), "--no-dashboard", "--concurrency", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert time.time() < deadline and proc.poll() is None, "no problem finished"
        time.sleep(0.3)
    ray_procs = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("terminated: finished problems are in"), err[-3000:]
    for word in ("Aborted", "Traceback", "SIGTERM received", "*** "):
        assert word not in err, err[-3000:]
    done = [json.loads(x) for x in results.read_text().splitlines()]
    assert 1 <= len(done) < 30 and all(r["status"] == "ok" for r in done)
    assert _gone(ray_procs), [p.name() for p in ray_procs if p.is_running()]


def test_sigterm_ends_an_eval_like_ctrl_c(gsm):
    root, data, rows = gsm
    many = _jsonl(root / "gsm-many.jsonl", [{"question": f"What is {i} + 1?", "answer": f"s\n#### {i + 1}"}
                                            for i in range(40)])
    cands = _jsonl(root / "c.jsonl", [{"task_id": f"gsm8k/{i}", "candidates": [f"It is {i + 1}.", f"It is {i}."]}
                                      for i in range(40)])
    out = root / "eval"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvjudge.app.cli", "eval", "gsm8k", "--model", "tiny-llama", "--data", str(many),
         "--candidates", str(cands), "--candidate-kv", "judge_prefix", "--methods", "dense,naive", "--seeds", "42",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while not (results.exists() and results.read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, "nothing judged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("terminated: judged triples are in"), err[-3000:]
    assert "Traceback" not in err
    lines = results.read_text().splitlines()
    assert 2 <= len(lines) < 80 and all(json.loads(x)["method"] in ("dense", "naive") for x in lines)


def test_progress_line_says_n_a_for_an_undefined_jcr(tmp_path):
    """The live line agrees with the summary: records whose consistency is undefined (dense's generated
    answer did not parse) are not counted as disagreements."""
    from kvjudge.experiments.judging import record_key, running_metrics
    from kvjudge.runtime.results import ResultsLog

    log = ResultsLog(tmp_path / "r.jsonl", key=record_key)
    rec = {"seed": 42, "passed": False}
    for i, c in enumerate([None, None]):
        log.append({**rec, "task_id": f"t{i}", "method": "dense", "consistent": True})
        log.append({**rec, "task_id": f"t{i}", "method": "naive", "consistent": c})
    assert running_metrics(log) == "pass@1 0.00  JCR naive n/a"
    log.append({**rec, "task_id": "t2", "method": "naive", "consistent": True})
    assert running_metrics(log).endswith("JCR naive 1.00")


def test_bench_compress_names_an_unknown_task_of_the_given_dataset(tmp_path):
    from kvjudge.experiments.bench.compress import read_candidate_sets
    from kvjudge.experiments.data import DataError

    path = _jsonl(tmp_path / "c.jsonl", [{"task_id": "HumanEval/9999", "candidates": ["a", "b"]}])
    with pytest.raises(DataError, match="task 'HumanEval/9999' is not a humaneval problem"):
        read_candidate_sets(path, "humaneval", candidate_kv="isolated")
