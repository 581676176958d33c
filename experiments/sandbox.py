"""Run untrusted (model-written) Python code in a separate, resource-limited process.

One check is one fresh interpreter (``sys.executable -I``: isolated mode, so no script dir,
no user site, ``PYTHON*`` variables ignored; ``site`` is kept so the stdlib and installed
packages import normally). The layers, from outside in:

* **process**: its own session and process group (``start_new_session=True``); on timeout, and
  always after the run, the whole group is killed with ``os.killpg(pgid, SIGKILL)``, so
  stragglers (forked children, sleeping threads) never outlive the check;
* **user / namespace** (``isolation_mode()``): when the caller is root and the interpreter can run as ``nobody`` (checked once),
  the child runs as uid/gid 65534 with no supplementary groups: it cannot signal the caller,
  write outside its own temporary directory, and ``RLIMIT_NPROC`` is enforced (it is ignored
  for root). As a non-root caller the child runs as the caller's user;
* **limits** (set by the trusted bootstrap inside the child before the untrusted code starts;
  no ``preexec_fn``, so it is safe to call from threads): ``RLIMIT_AS`` = ``memory_mb``,
  ``RLIMIT_CPU`` = ``ceil(timeout_s) + 1`` s, ``RLIMIT_FSIZE`` = ``fsize_mb`` (also bounds the
  captured output files), ``RLIMIT_CORE`` = 0, ``RLIMIT_NOFILE`` = 256, and ``RLIMIT_NPROC`` =
  64 when running as ``nobody``;
* **guard**: before the untrusted code runs, the process-creating and signalling functions of
  ``os``/``posix``/``signal``/``subprocess``/``_posixsubprocess`` are replaced by functions
  that raise ``PermissionError`` (a naive fork bomb or ``os.kill(os.getppid(), 9)`` then fails
  at once). This is a speed bump, not a security boundary (``ctypes`` goes around it);
* **filesystem**: a fresh ``tempfile.TemporaryDirectory`` as cwd and ``HOME``, removed after;
  an environment reduced to ``PATH``, ``HOME``, ``TMPDIR``, ``LANG``; stdin is ``/dev/null``
  for the untrusted code; stdout/stderr go to files outside that directory and only their
  first/last few KiB are read back.

Success is **positive**: the bootstrap receives a random per-check token through its stdin
pipe (never on disk, argv or the environment), runs the program, and writes the token to a
saved copy of stdout only if the whole program ran to its end. ``sys.exit(0)``,
``os._exit(0)``, a killed process, a closed stdout, ... therefore all count as failures.

This is meant for buggy or careless code (what LLM candidates are), not for a determined
attacker: use a container/VM boundary for that. Verdicts (``SandboxResult.status``):
``"passed"`` (ran to the end, token seen), ``"failed"`` (ran and raised — e.g. a failing
``assert`` — or exited before its end), ``"timeout"`` (wall-clock or CPU limit),
``"memory"`` (``MemoryError`` under ``RLIMIT_AS``), ``"error"`` (did not compile, killed by a
signal, or the sandbox itself could not start it).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_untrusted", "check_humaneval", "extract_code", "build_humaneval_program",
           "isolation_mode"]

NOBODY_UID = 65534
_OUTPUT_HEAD = 4096
_OUTPUT_TAIL = 4096
_EXC_MARK = "__KVJUDGE_SANDBOX_EXC__"


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``passed`` is True only for ``status == "passed"``; ``detail`` is one short line (the
    exception, the signal, or the reason); ``duration_s`` is the wall time of the child
    (start to reap), including interpreter start-up (~20-50 ms).
    """

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    detail: str
    duration_s: float


# The trusted bootstrap, run with ``python -I -c``. argv: memory bytes, cpu seconds, fsize bytes,
# nproc limit (0 = leave). stdin: token line, then the program source.
_BOOTSTRAP = r'''
import os, sys, resource, builtins
def _lim(which, value):
    try:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))
    except (ValueError, OSError):
        pass
_mem, _cpu, _fsize, _nproc = (int(a) for a in sys.argv[1:5])
_data = sys.stdin.buffer.read()
_tok, _, _src = _data.partition(b"\n")
_tok = _tok.decode("ascii")
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
_out = os.dup(1)
_lim(resource.RLIMIT_CORE, 0)
_lim(resource.RLIMIT_AS, _mem)
_lim(resource.RLIMIT_CPU, _cpu)
_lim(resource.RLIMIT_FSIZE, _fsize)
_lim(resource.RLIMIT_NOFILE, 256)
if _nproc > 0:
    _lim(resource.RLIMIT_NPROC, _nproc)
import gc, signal, subprocess, posix
try:
    import _posixsubprocess
except ImportError:
    _posixsubprocess = None
def _denied(*a, **k):
    raise PermissionError("blocked by the kvjudge sandbox")
_names = ("kill", "killpg", "fork", "forkpty", "vfork", "system", "popen", "posix_spawn",
          "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp",
          "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
          "spawnvpe", "setsid", "setpgid", "setpgrp", "pidfd_open")
for _m in (os, posix):
    for _n in _names:
        if hasattr(_m, _n):
            setattr(_m, _n, _denied)
for _n in ("pthread_kill", "pidfd_send_signal"):
    if hasattr(signal, _n):
        setattr(signal, _n, _denied)
subprocess.Popen = _denied
subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _denied
if _posixsubprocess is not None:
    _posixsubprocess.fork_exec = _denied
del _m, _n, _names, _data
_ns = {"__name__": "__main__", "__builtins__": builtins}
def _fail(kind, msg):
    try:
        _ns.clear()
        gc.collect()
    except BaseException:
        pass
    try:
        line = (kind + ": " + str(msg)).replace("\n", " ")[:300]
    except BaseException:
        line = kind
    try:
        os.write(2, ("\n" + "__KVJUDGE_SANDBOX_EXC__ " + line + "\n").encode("utf-8", "replace"))
    except BaseException:
        pass
    os._exit(1)
try:
    _code = compile(_src, "<candidate>", "exec")
except MemoryError:
    _fail("MemoryError", "")
except BaseException as _e:
    _fail("CompileError " + type(_e).__name__, _e)
del _src
try:
    exec(_code, _ns)
except SystemExit as _e:
    _fail("SystemExit", "exited with code %r before the end of the program" % (_e.code,))
except MemoryError:
    _fail("MemoryError", "")
except BaseException as _e:
    _fail(type(_e).__name__, _e)
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
try:
    os.write(_out, ("\n" + _tok + "\n").encode("ascii"))
except BaseException:
    os._exit(1)
os._exit(0)
'''

_mode_lock = threading.Lock()
_mode: tuple[str, tuple[str, ...]] | None = None
_UNSHARE_ARGS = ("--user", "--map-root-user", "--pid", "--fork", "--kill-child")


def _probe(cmd: list[str], **kwargs) -> bool:
    try:
        r = subprocess.run(cmd + [sys.executable, "-I", "-c", "pass"], env=_base_env("/"), cwd="/",
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, **kwargs)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError, ValueError):
        return False


def isolation_mode() -> str:
    """How children are isolated here (probed once): ``"nobody"``, ``"pidns"`` or ``"none"``.

    ``"nobody"``: the caller is root and ``sys.executable`` runs as uid/gid 65534.
    ``"pidns"``: ``unshare --user --map-root-user --pid --fork --kill-child`` works: the child
    is pid 1 of its own PID namespace, so it cannot name (hence signal) the caller or anything
    outside, ``getppid()`` is 0, and killing it kills everything it spawned.
    ``"none"``: only the guard and the process group.
    """
    return _isolation()[0]


def _isolation() -> tuple[str, tuple[str, ...]]:
    global _mode
    with _mode_lock:
        if _mode is None:
            mode: tuple[str, tuple[str, ...]] = ("none", ())
            if os.environ.get("KVJUDGE_SANDBOX_ISOLATION", "") != "none":
                if hasattr(os, "geteuid") and os.geteuid() == 0 and _probe(
                        [], user=NOBODY_UID, group=NOBODY_UID, extra_groups=[]):
                    mode = ("nobody", ())
                else:
                    unshare = shutil.which("unshare")
                    if unshare and _probe([unshare, *_UNSHARE_ARGS, "--"]):
                        mode = ("pidns", (unshare, *_UNSHARE_ARGS, "--"))
            _mode = mode
        return _mode


def _base_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _read_capped(path: str) -> tuple[str, str]:
    """(head, tail) of a captured output file, each at most a few KiB."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(_OUTPUT_HEAD)
            if size > _OUTPUT_HEAD:
                fh.seek(max(_OUTPUT_HEAD, size - _OUTPUT_TAIL))
                tail = fh.read(_OUTPUT_TAIL)
            else:
                tail = head
    except OSError:
        return "", ""
    return head.decode("utf-8", "replace"), tail.decode("utf-8", "replace")


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def run_untrusted(code: str, timeout_s: float = 5.0, memory_mb: int = 512, *, fsize_mb: int = 8) -> SandboxResult:
    """Run ``code`` as a ``__main__`` program in a fresh sandboxed interpreter (see module doc).

    Never raises for anything the code does; never waits longer than about ``timeout_s`` plus
    interpreter start-up. ``memory_mb`` caps the address space (``RLIMIT_AS``), ``fsize_mb``
    the size of any file the child writes (its captured stdout/stderr included).
    """
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    token = "KVJUDGE_OK_" + secrets.token_hex(16)
    mem = int(memory_mb) * 1024 * 1024
    cpu = int(math.ceil(timeout_s)) + 1
    fsize = int(fsize_mb) * 1024 * 1024
    mode, prefix = _isolation()
    as_nobody = mode == "nobody"
    nproc = 64 if as_nobody else 0
    payload = (token + "\n").encode("ascii") + code.encode("utf-8", "surrogatepass")

    with tempfile.TemporaryDirectory(prefix="kvj-out-") as outdir, \
            tempfile.TemporaryDirectory(prefix="kvj-box-") as workdir:
        out_path = os.path.join(outdir, "stdout")
        err_path = os.path.join(outdir, "stderr")
        kwargs = {}
        if as_nobody:
            try:
                os.chown(workdir, NOBODY_UID, NOBODY_UID)
                kwargs = dict(user=NOBODY_UID, group=NOBODY_UID, extra_groups=[])
            except OSError:
                kwargs = {}
                nproc = 0
        start = time.perf_counter()
        timed_out = False
        try:
            with open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-I", "-c", _BOOTSTRAP, str(mem), str(cpu), str(fsize), str(nproc)],
                    stdin=subprocess.PIPE, stdout=fout, stderr=ferr, cwd=workdir,
                    env=_base_env(workdir), close_fds=True, start_new_session=True, **kwargs)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return SandboxResult(False, "error", _one_line(f"could not start sandbox: {exc}"),
                                 time.perf_counter() - start)
        try:
            try:
                proc.communicate(input=payload, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            except (BrokenPipeError, OSError):
                # The child died before reading its input; reap it below.
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc.pid)
                    proc.wait()
        finally:
            _kill_group(proc.pid)  # stragglers left in the group (daemonised children, ...)
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        duration = time.perf_counter() - start
        rc = proc.returncode
        out_head, out_tail = _read_capped(out_path)
        err_head, err_tail = _read_capped(err_path)

    return _classify(rc, timed_out, token, out_tail, err_head, err_tail, duration, timeout_s, memory_mb)


def _classify(rc: int, timed_out: bool, token: str, out_tail: str, err_head: str, err_tail: str,
              duration: float, timeout_s: float, memory_mb: int) -> SandboxResult:
    if timed_out:
        return SandboxResult(False, "timeout", f"killed after {timeout_s:g} s wall time", duration)
    marks = [ln for ln in err_tail.splitlines() if ln.startswith(_EXC_MARK)]
    mark = marks[-1][len(_EXC_MARK):].strip() if marks else ""
    if rc == 0:
        if out_tail.rstrip().endswith(token):
            return SandboxResult(True, "passed", "ok", duration)
        return SandboxResult(False, "failed", "exited with status 0 before the end of the program", duration)
    if rc is not None and rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return SandboxResult(False, "timeout", "CPU time limit exceeded (SIGXCPU)", duration)
        if sig == signal.SIGXFSZ:
            return SandboxResult(False, "error", "file size limit exceeded (SIGXFSZ)", duration)
        return SandboxResult(False, "error", f"killed by signal {name}", duration)
    if mark.startswith("MemoryError"):
        return SandboxResult(False, "memory", f"MemoryError (address-space limit {memory_mb} MiB)", duration)
    if mark.startswith("CompileError"):
        return SandboxResult(False, "error", _one_line(mark[len("CompileError"):].strip()), duration)
    if mark:
        return SandboxResult(False, "failed", _one_line(mark), duration)
    # No marker: the interpreter itself failed (e.g. could not start under the limits).
    last = [ln for ln in (err_tail or err_head).splitlines() if ln.strip()]
    if last and "MemoryError" in last[-1]:
        return SandboxResult(False, "memory", _one_line(last[-1]), duration)
    detail = _one_line(last[-1]) if last else f"exited with status {rc}"
    return SandboxResult(False, "failed" if rc == 1 else "error", detail, duration)


# --- HumanEval ---------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """Strip Markdown code fences from a model answer.

    No ```` ``` ```` in ``text``: returned unchanged (a raw completion keeps its indentation).
    Otherwise the fenced blocks are collected (an unclosed final fence runs to the end of the
    text) and one is chosen: the first that defines ``def entry_point(`` when ``entry_point``
    is given, else the first tagged ``python``/``py`` (or untagged), else the longest.
    """
    if "```" not in text:
        return text
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    if not blocks:
        return text.replace("```", "")
    if entry_point:
        pat = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
        for _, body in blocks:
            if pat.search(body):
                return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body
    return max(blocks, key=lambda b: len(b[1]))[1]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def build_humaneval_program(problem: dict, completion: str) -> str:
    """The program text for one HumanEval check.

    Standard form: ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.
    When the (fence-stripped) completion restates ``def entry_point(`` itself — what chat models
    do — the body is ``prompt + "\\n\\n" + dedent(completion)`` instead: the prompt's function
    is docstring-only and therefore valid, the completion's later ``def`` replaces it, and the
    prompt's imports and helper functions (e.g. HumanEval/38, /50) stay available. For the
    entry point this behaves as "the completion alone".
    """
    entry = problem["entry_point"]
    code = extract_code(completion, entry)
    if _defines(code, entry):
        body = problem["prompt"] + "\n\n" + textwrap.dedent(code)
    else:
        body = problem["prompt"] + code
    return body + "\n\n" + problem["test"] + "\n\n" + f"check({entry})\n"


def check_humaneval(problem: dict, completion: str, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run ``problem``'s unit tests on ``completion`` in the sandbox (see ``build_humaneval_program``)."""
    return run_untrusted(build_humaneval_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb)
