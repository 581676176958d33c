"""Run one check and classify it: start U (the candidate, wrapped into its isolation level) and T (the
trusted harness), wire their pipes, wait, kill what is left, and turn T's verdict and U's exit status
into a ``SandboxResult``. The two programs are ``programs/untrusted.py`` and ``programs/harness.py``,
read as text and started with ``python -I -S -c``.
"""

from __future__ import annotations

import functools
import json
import marshal
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources

from . import isolation

NPROC = 64  # RLIMIT_NPROC of a check at the isolated levels
_OUTPUT_HEAD = 4096
_OUTPUT_TAIL = 4096
_EXC_MARK = "__KVJUDGE_SANDBOX_EXC__"  # these three are written by programs/untrusted.py
_SETUP_MARK = "__KVJUDGE_SANDBOX_SETUP__"
_SETUP_EXIT = 97


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``passed`` is True only for ``status == "passed"``; ``detail`` is one short line (the
    exception, the signal, or the reason); ``duration_s`` is the wall time from start to the
    verdict, interpreter start-up included.
    """

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    detail: str
    duration_s: float


@functools.lru_cache(maxsize=None)
def program(name: str) -> str:
    """The source of ``programs/<name>.py`` (``untrusted``, ``harness``, ``probe``), package data."""
    return resources.files(__package__).joinpath("programs", f"{name}.py").read_text(encoding="utf-8")


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


def _stop(proc: subprocess.Popen, grace_s: float, wrapped: bool = False) -> None:
    """Wait up to ``grace_s`` for ``proc``, then kill it with everything it started.

    ``wrapped`` (a bwrap/unshare wrapper): its children (PID 1 of the namespace) are killed
    first; the kernel then kills the whole namespace and the wrapper exits only after that."""
    try:
        proc.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    if wrapped:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as fh:
                children = [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            children = []
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            proc.wait(timeout=2.0)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def run_untrusted(code: str, timeout_s: float = 5.0, memory_mb: int = 512, *, fsize_mb: int = 8,
                  tests: str | None = None, tests_prelude: str = "", expose: tuple[str, ...] = (),
                  unsafe_exec: bool = False, level: str | None = None) -> SandboxResult:
    """Run ``code`` as a ``__main__`` program in the sandbox, then ``tests`` outside it.

    Without ``tests``, "passed" means the program ran to its end (an exit or exception before
    it fails; the program itself decides, so this is no defence against code that wants to
    pass). With ``tests``, the trusted harness runs ``tests_prelude`` and then ``tests``, where
    each name in ``expose`` calls the candidate's function of that name (arguments pickled,
    results plain data): "passed" means the tests ran to their end (see the module doc).
    ``level`` forces an isolation level (must be available); default ``require_isolation(unsafe_exec)``.
    Never raises for anything the code does; returns after about ``timeout_s`` at most.
    """
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if level is None:
        level = isolation.require_isolation(unsafe_exec)
    elif not isolation.level_available(level):
        raise isolation.SandboxUnavailable(f"isolation level {level!r} is not available here")
    elif level == "none" and not unsafe_exec:
        raise isolation.SandboxUnavailable(isolation.UNAVAILABLE_MESSAGE)
    return execute(level, code, timeout_s, memory_mb, fsize_mb, tests, tests_prelude, tuple(expose), NPROC)


def execute(level: str, code: str, timeout_s: float, memory_mb: int, fsize_mb: int, tests: str | None,
            prelude: str, expose: tuple[str, ...], nproc: int) -> SandboxResult:
    """One check: start the untrusted process and the trusted harness, wire their pipes, wait, kill
    what is left and read the verdict. Long on purpose: every process and pipe it opens is closed
    in the same function, so nothing can outlive a check on any path."""
    root = os.geteuid() == 0
    wrapper = isolation.wrapper(level, root)
    if wrapper is None:
        return SandboxResult(False, "error", f"isolation level {level} is not installed", 0.0)
    token = secrets.token_hex(16)
    cpu = int(math.ceil(timeout_s)) + 1
    mem, fsize = int(memory_mb) << 20, int(fsize_mb) << 20
    with tempfile.TemporaryDirectory(prefix="kvj-out-") as outdir, \
            tempfile.TemporaryDirectory(prefix="kvj-box-", ignore_cleanup_errors=True) as hostbox:
        workdir = hostbox if level == "none" else isolation.BOX
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        ucfg = {"level": level, "uid": isolation.pick_uid() if root and level != "none" else 0, "mem": mem, "cpu": cpu,
                "fsize": fsize, "nproc": nproc if level != "none" else 0, "req": req_r, "resp": resp_w,
                "workdir": workdir, "box_bytes": isolation.BOX_BYTES,
                "plan": isolation.mount_plan(root)["steps"] if level == "unshare" else None}
        tcfg = {"token": token, "code": code, "prelude": prelude, "tests": tests, "expose": list(expose),
                "req": req_w, "resp": resp_r, "mem": max(mem, 1 << 30), "cpu": cpu, "fsize": fsize,
                "undumpable": level == "none"}
        paths = {k: os.path.join(outdir, k) for k in ("out", "err", "terr")}
        start = time.perf_counter()
        u = t = None
        try:
            with open(paths["out"], "wb") as uout, open(paths["err"], "wb") as uerr, open(paths["terr"], "wb") as terr:
                ucmd = [*wrapper, isolation.interpreter(), "-I", "-S", "-c", program("untrusted"), marshal.dumps(ucfg).hex()]
                u = subprocess.Popen(ucmd,
                                     stdin=subprocess.DEVNULL, stdout=uout, stderr=uerr,
                                     cwd=workdir if level == "none" else outdir, env=_base_env(workdir),
                                     close_fds=True, pass_fds=(req_r, resp_w), start_new_session=True)
                t = subprocess.Popen([sys.executable, "-I", "-S", "-c", program("harness")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=terr, cwd=outdir, env=_base_env(outdir),
                                     close_fds=True, pass_fds=(req_w, resp_r), start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for proc in (u, t):
                if proc is not None:
                    _stop(proc, 0.0, wrapped=proc is u and level != "none")
            return SandboxResult(False, "error", _one_line(f"could not start sandbox: {exc}"),
                                 time.perf_counter() - start)
        finally:
            for fd in (req_r, req_w, resp_r, resp_w):
                os.close(fd)
        timed_out, out = False, b""
        try:
            try:
                out, _ = t.communicate(json.dumps(tcfg).encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            except OSError:
                pass
            verdict = _parse_verdict(out, token) if not timed_out and t.returncode == 0 else None
            duration = time.perf_counter() - start
            died = verdict is not None and verdict["status"] == "died"
            grace = 0.0 if timed_out else max(0.0, min(1.0, timeout_s - duration)) if died else 0.3
            _stop(u, grace, wrapped=level != "none")
        finally:
            _stop(t, 0.0)
            _stop(u, 0.0, wrapped=level != "none")
        _, err_tail = _read_capped(paths["err"])
        _, terr_tail = _read_capped(paths["terr"])
    return _classify(verdict, u.returncode, timed_out, level, err_tail, terr_tail, duration, timeout_s, memory_mb)


def _parse_verdict(out: bytes, token: str) -> dict | None:
    try:
        verdict = json.loads(out.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    if not isinstance(verdict, dict) or verdict.get("token") != token:
        return None
    return verdict


def _classify(verdict: dict | None, rc: int | None, timed_out: bool, level: str, err_tail: str, terr_tail: str,
              duration: float, timeout_s: float, memory_mb: int) -> SandboxResult:
    if timed_out:
        return SandboxResult(False, "timeout", f"killed after {timeout_s:g} s wall time", duration)
    if verdict is None:
        last = [ln for ln in terr_tail.splitlines() if ln.strip()]
        return SandboxResult(False, "error", _one_line("the test harness did not report" +
                                                       (f": {last[-1]}" if last else "")), duration)
    status, detail = str(verdict.get("status")), _one_line(str(verdict.get("detail", "")))
    if status == "passed":
        return SandboxResult(True, "passed", "ok", duration)
    if status == "memory":
        return SandboxResult(False, "memory", f"MemoryError (address-space limit {memory_mb} MiB)", duration)
    if status in ("failed", "error"):
        return SandboxResult(False, status, detail or status, duration)
    # "died": the candidate process ended without a reply; its exit status tells why.
    setup = [ln for ln in err_tail.splitlines() if ln.startswith(_SETUP_MARK)]
    if rc == _SETUP_EXIT and setup:
        return SandboxResult(False, "error", _one_line("sandbox set-up failed:" + setup[-1][len(_SETUP_MARK):]),
                             duration)
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and rc > 128 and level != "none" else 0)
    if sig == signal.SIGXCPU:
        return SandboxResult(False, "timeout", "CPU time limit exceeded (SIGXCPU)", duration)
    if sig == signal.SIGXFSZ:
        return SandboxResult(False, "error", "file size limit exceeded (SIGXFSZ)", duration)
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return SandboxResult(False, "error", f"killed by signal {name}", duration)
    if rc == 0:
        return SandboxResult(False, "failed", "exited with status 0 before the end of the program", duration)
    marks = [ln[len(_EXC_MARK):].strip() for ln in err_tail.splitlines() if ln.startswith(_EXC_MARK)]
    last = [ln for ln in err_tail.splitlines() if ln.strip()]
    if (marks and marks[-1].startswith("MemoryError")) or (last and "MemoryError" in last[-1]):
        return SandboxResult(False, "memory", f"MemoryError (address-space limit {memory_mb} MiB)", duration)
    text = marks[-1] if marks else (last[-1] if last else f"exited with status {rc}")
    return SandboxResult(False, "failed", _one_line(text), duration)
