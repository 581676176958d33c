"""Sandbox: careless programs must fail (never pass, hang, or hurt the caller); HumanEval checks;
the harness protocol (values, exceptions). Deliberate attacks: test_sandbox_hostile.py."""

from __future__ import annotations

import os
import time

import pytest

from kvjudge.experiments.data import load_humaneval
from kvjudge.experiments.datasets import build_humaneval_program, check_humaneval, extract_code
from kvjudge.sandbox import SandboxResult, isolation_level, run_untrusted

CALLER = os.getpid()


def check(problem: dict, completion: str, **kw) -> SandboxResult:
    return check_humaneval(problem, completion, unsafe_exec=True, **kw)


def run(code: str, timeout_s: float = 2.0, **kw) -> SandboxResult:
    t0 = time.perf_counter()
    res = run_untrusted(code, timeout_s=timeout_s, unsafe_exec=True, **kw)  # the behaviour, whatever the level
    elapsed = time.perf_counter() - t0
    assert elapsed < timeout_s + 5.0, f"sandbox took {elapsed:.1f}s"
    assert os.getpid() == CALLER
    os.kill(CALLER, 0)  # the caller is alive and signalable
    assert isinstance(res.detail, str) and "\n" not in res.detail
    assert res.passed == (res.status == "passed")
    return res


def test_plain_program_passes_and_output_is_ignored():
    res = run("x = sum(range(10))\nassert x == 45\nprint('hello ' * 1000)")
    assert res.status == "passed" and res.passed and res.duration_s > 0


def test_failing_assert_is_failed():
    res = run("assert 1 == 2, 'nope'")
    assert res.status == "failed" and "AssertionError" in res.detail and "nope" in res.detail


def test_syntax_error_is_error():
    res = run("def f(:\n    pass\n")
    assert res.status == "error" and "SyntaxError" in res.detail


@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_infinite_loop_and_sleep_time_out(code):
    res = run(code, timeout_s=1.0)
    assert res.status == "timeout" and not res.passed
    assert res.duration_s < 4.0


@pytest.mark.parametrize("code", [
    "a = []\nwhile True:\n    a.append(bytearray(10**7))\n",
    "x = bytearray(10**10)\n",
])
def test_memory_bomb_is_memory(code):
    res = run(code, timeout_s=3.0, memory_mb=256)
    assert res.status == "memory" and not res.passed


def test_kill_parent_does_not_kill_caller():
    res = run("import os\nos.kill(os.getppid(), 9)\n")
    assert not res.passed and res.status in ("failed", "error")


def test_killpg_own_group_does_not_kill_caller():
    res = run("import os\nos.killpg(0, 9)\n")
    assert not res.passed
    res = run("import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n")
    assert not res.passed


@pytest.mark.skipif(isolation_level() == "none", reason="needs a PID namespace")
def test_kill_parent_through_ctypes_does_not_kill_caller():
    # Goes around the Python-level guard; only the OS isolation protects the caller here.
    run("import ctypes, os\nctypes.CDLL(None).kill(os.getppid(), 9)\n")


def test_fork_bomb_is_bounded():
    res = run("import os\nwhile True:\n    os.fork()\n")
    assert not res.passed and res.status in ("failed", "error", "timeout")
    res = run("import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n")
    assert not res.passed


def test_huge_file_and_huge_output_fail():
    res = run("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (64 * 1024 * 1024))\n", timeout_s=3.0)
    assert not res.passed and res.status in ("failed", "error", "memory")
    res = run("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n", timeout_s=3.0)
    assert not res.passed


@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)\nassert False\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit\n",
    "exit()\n",
])
def test_early_exit_is_failure(code):
    res = run(code)
    assert res.status == "failed" and not res.passed


def test_printing_a_fake_token_does_not_pass():
    res = run("print('KVJUDGE_OK_' + '0' * 32)\nimport os\nos._exit(0)\n")
    assert not res.passed


def test_stdin_is_empty():
    res = run("import sys\nassert sys.stdin.read() == ''\n")
    assert res.passed


# --- the harness protocol: candidate in the sandbox, tests outside ----------------------------------

def test_values_cross_the_boundary_as_plain_data():
    code = (
        "from collections import OrderedDict, namedtuple\n"
        "P = namedtuple('P', 'a b')\n"
        "def f(x, *, k):\n"
        "    return [x, (2.5, 'x\\u00e9\\n\\x01\"'), {3: b'y', 'z': None}, {4}, frozenset([5]), True, float('inf'),\n"
        "            1 + 2j, -(2 ** 100), OrderedDict(a=1), P(1, 2), bytearray(b'q'), k]\n")
    tests = ("r = f(7, k=[1])\n"
             "assert r == [7, (2.5, 'x\\u00e9\\n\\x01\"'), {3: b'y', 'z': None}, {4}, frozenset([5]), True,\n"
             "             float('inf'),\n"
             "             1 + 2j, -(2 ** 100), {'a': 1}, (1, 2), b'q', [1]], r\n"
             "assert [type(v) for v in r[1:4]] == [tuple, dict, set] and type(r[9]) is dict and type(r[10]) is tuple\n"
             "assert type(r[5]) is bool and type(r[8]) is int\n")
    res = run(code, tests=tests, expose=("f",))
    assert res.passed, res


def test_wrong_value_fails_with_the_test_assertion():
    res = run("def f():\n    return 41\n", tests="assert f() == 42, 'wanted 42'", expose=("f",))
    assert res.status == "failed" and "AssertionError" in res.detail and "wanted 42" in res.detail


def test_candidate_exceptions_keep_builtin_types():
    code = "def f(x):\n    return 10 // x\nclass Odd(Exception):\n    pass\ndef g():\n    raise Odd('strange')\n"
    tests = ("try:\n    f(0)\nexcept ZeroDivisionError:\n    pass\nelse:\n    raise AssertionError('no error')\n"
             "assert f(5) == 2\n")
    assert run(code, tests=tests, expose=("f", "g")).passed
    res = run(code, tests="g()", expose=("f", "g"))
    assert res.status == "failed" and "CandidateError" in res.detail and "Odd: strange" in res.detail


def test_non_plain_return_and_missing_function_fail():
    res = run("def f():\n    return object()\n", tests="f()", expose=("f",))
    assert res.status == "failed" and "not plain data" in res.detail
    res = run("x = 1\n", tests="f()", expose=("f",))
    assert res.status == "failed" and "NameError" in res.detail


def test_module_level_failure_is_reported_before_the_tests():
    res = run("raise ValueError('at import')\ndef f():\n    return 1\n", tests="assert f() == 1", expose=("f",))
    assert res.status == "failed" and "ValueError: at import" in res.detail


def test_tests_prelude_helpers_stay_on_the_trusted_side():
    prelude = "def helper(x):\n    return x * 2\ndef f(x):\n    'stub'\n"
    code = "def helper(x):\n    return 0\ndef f(x):\n    return x * 2\n"  # the tests do not use this helper
    res = run(code, tests="assert f(3) == helper(3) == 6", tests_prelude=prelude, expose=("f",))
    assert res.passed, res


# --- HumanEval ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def problems():
    return {p["id"]: p for p in load_humaneval()}


def test_humaneval_canonical_solution_passes(problems):
    p = problems["HumanEval/0"]
    res = check(p, p["canonical_solution"])
    assert res.status == "passed", res.detail


def test_humaneval_wrong_completion_fails(problems):
    p = problems["HumanEval/0"]
    res = check(p, "    return False\n")
    assert res.status == "failed" and not res.passed


def test_humaneval_chat_style_restated_function(problems):
    p = problems["HumanEval/0"]
    answer = (
        "Here is the solution:\n\n```python\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    for i, a in enumerate(numbers):\n"
        "        for j, b in enumerate(numbers):\n"
        "            if i != j and abs(a - b) < threshold:\n"
        "                return True\n"
        "    return False\n"
        "```\nThis works because ..."
    )
    assert extract_code(answer).startswith("def has_close_elements")
    prog = build_humaneval_program(p, answer)
    assert "```" not in prog and prog.rstrip().endswith("check(has_close_elements)")
    res = check(p, answer)
    assert res.status == "passed", res.detail


def test_humaneval_helper_in_prompt_kept_for_restated_function(problems):
    p = problems["HumanEval/38"]  # decode_cyclic relies on encode_cyclic from the prompt
    answer = "```python\ndef decode_cyclic(s: str):\n" + p["canonical_solution"] + "```"
    assert check(p, answer).passed


def test_humaneval_hanging_completion_times_out(problems):
    p = problems["HumanEval/0"]
    res = check(p, "    while True:\n        pass\n", timeout_s=1.0)
    assert res.status == "timeout"


def test_extract_code_variants():
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    two = "```text\nnotes\n```\n```python\ndef g():\n    pass\n```\n```python\ndef f():\n    pass\n```"
    assert extract_code(two, "f") == "def f():\n    pass\n"
    assert extract_code(two) == "def g():\n    pass\n"
    assert extract_code("```python\ndef f():\n    return 2\n") == "def f():\n    return 2\n"  # unclosed
