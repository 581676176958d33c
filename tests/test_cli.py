"""The command line: verdicts as JSON, benchmark JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvjudge.app.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_judge_json_verdict(capsys, tmp_path):
    cand = tmp_path / "c2.txt"
    cand.write_text("def add(a, b):\n    return a - b\n")
    code, out, err = _run(capsys, "judge", "--model", "tiny-llama", "--method", "naive", "--problem", "Add a and b.",
                          "--candidate", "def add(a, b): return a + b", "--candidate", f"@{cand}", "--json")
    assert code == 0, err
    verdict = json.loads(out)
    assert verdict["method"] == "naive" and verdict["reused"] is True
    assert len(verdict["scores"]) == 2 and verdict["winner"] in (1, 2)
    assert verdict["winner"] == verdict["scores"].index(max(verdict["scores"])) + 1


def test_judge_table_output(capsys):
    code, out, _ = _run(capsys, "judge", "--model", "tiny-llama", "--problem", "p", "--candidate", "first answer",
                        "--candidate", "second answer")
    assert code == 0 and "first answer" in out and "winner #" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["judge", "--method", "nope", "--problem", "p", "--candidate", "a"], "unknown judge method 'nope'; known methods: dense"),
        (["judge", "--problem", "p"], "no candidates"),
        (["judge", "--problem", "  ", "--candidate", "a"], "problem is empty"),
        (["judge", "--problem", "p"] + [f"--candidate=c{i}" for i in range(10)], "too many candidates"),
        (["judge", "--problem", "@/no/such/file", "--candidate", "a"], "cannot read '/no/such/file'"),
        (["judge", "--model", "/no/such/model", "--problem", "p", "--candidate", "a"], "neither a built-in alias"),
        (["bench", "judge", "--candidates", "0"], "--candidates must be >= 1"),
        (["bench", "generate", "--batch-sizes", "1,x"], "--batch-sizes: '1,x' is not a comma-separated list"),
        (["bench", "generate", "--batch-sizes", "2,2"], "--batch-sizes: give distinct positive integers"),
        (["judge", "--problem", "p", "--candidate", "a", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "kvjudge.app.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_judge_json(capsys):
    code, out, err = _run(capsys, "bench", "judge", "--model", "tiny-llama", "--candidates", "2",
                          "--candidate-tokens", "24", "--repeats", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = result["methods"]
    assert set(rows) >= {"dense", "naive", "kvcomm", "pal_kv", "random_gate", "dg_jkr"}
    assert rows["dense"]["ratio_to_dense"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["median_ms"] > 0
        assert row["ratio_to_dense"] == pytest.approx(row["median_ms"] / rows["dense"]["median_ms"])
    assert rows["naive"]["reuse_rate"] == 1.0 and rows["dense"]["reuse_rate"] == 0.0


def test_bench_generate_json(capsys):
    code, out, err = _run(capsys, "bench", "generate", "--model", "tiny-llama", "--batch-sizes", "2,1",
                          "--new-tokens", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = result["batches"]
    assert [int(b) for b in rows] == [2, 1] and result["new_tokens"] == 5
    for b, row in rows.items():
        assert row["tokens"] == int(b) * 5  # greedy, no early stop
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
        assert result["speedup"][b] == pytest.approx(row["tokens_per_s"] / rows["2"]["tokens_per_s"])


def test_dataset_choices_come_from_the_registry():
    from kvjudge.app.cli import build_parser
    from kvjudge.experiments.datasets import DATASETS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("eval", "calibrate"):
        dataset = next(a for a in sub[command]._actions if a.dest == "dataset")
        assert tuple(dataset.choices) == tuple(DATASETS), command


def test_validate_ok_and_bad_yaml(capsys, tmp_path):
    code, out, _ = _run(capsys, "validate", "debate")
    assert code == 0 and "debate: ok" in out and "rounds 2" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents:\n  a: {role: r, prompt: 'x {problem}', temprature: 0.1}\nedges: []\njudge: {method: naive}\n")
    proc = subprocess.run([sys.executable, "-m", "kvjudge.app.cli", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{bad}:2: agents.a.temprature" in lines[0] and "did you mean 'temperature'" in lines[0]
    code, _, err = _run(capsys, "run", "no-such-topology", "--model", "tiny-llama")
    assert code == 2 and "no-such-topology" in err and len(err.strip().splitlines()) == 1
