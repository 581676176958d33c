"""Run untrusted (model-written) Python code in an isolated, resource-limited process.

**Two processes per check.** ``run_untrusted(code, tests=..., expose=...)`` starts

* **U** (untrusted): runs ``code`` inside the sandbox below, then serves calls: "call ``name``
  with these (pickled) arguments" -> a reply in a small tagged JSON encoding of plain data
  (``None``/bool/int/float/complex/str/bytes and lists, tuples, dicts, sets of them);
* **T** (trusted harness): an ordinary child of the caller that never runs candidate code. It
  sends the program to U, runs ``tests_prelude`` (HumanEval: the prompt, for helpers such as
  ``poly``), waits for U's "ready", binds every name in ``expose`` to a proxy that calls U, runs
  ``tests`` (HumanEval: ``test`` + ``check(entry_point)``; trusted code) and writes its verdict,
  with a random per-check token it got on its stdin, to a pipe only it and the caller hold.

A check is ``"passed"`` only when T's verdict carries the token and says the tests ran to their
end. Replies from U are decoded with ``json.loads`` and a strict tagged decoder into builtin types
(frames <= 32 MiB), so the tests compare plain data: no ``__eq__`` of U's making, no pickle from
U, nothing U sends is executed. Without ``tests``, "passed" only means that U reported reaching
the end of ``code``: U's own word, no integrity claim.

**What an attacker (the candidate code) can do**: anything inside U: read or patch U's globals,
frames, ``gc``, ``ctypes``, its fds and ``/proc/self``; write junk to its two pipes; exit with
any status; return any plain value (answers looked up in a test file it can read included: the
filesystem is readable). **What it cannot do** (isolated levels): reach T or the caller. No
secret exists in U (the token lives only in T and the caller); U's only fds are its pipes to T
and its output files; T runs nothing from U and lies outside U's PID, mount and network
namespaces (U cannot see, signal, ``ptrace`` or open ``/proc/<pid>/fd`` of T), and for a root
caller U also runs under another uid. Forging a pass would need the token on T's private pipe,
or T's tests passing on the plain values U returns, which is solving the task. An exit of U
(``os._exit(0)``, a signal, ``SystemExit`` in a call) at any point is a failure, even if the
tests catch the error. At level ``"none"`` T makes itself non-dumpable (no ``ptrace`` or
``/proc/<pid>/mem`` by the same non-root user), but a root caller has no such guarantee.

**Isolation of U** (``isolation_level()``, probed once with a real sandboxed run checked from
outside: no file written outside its dir, ``/etc/shadow`` unreadable, no connection to a host
loopback listener, no capabilities, ``no_new_privs``, a per-check ``RLIMIT_NPROC`` that bites):

* ``"bwrap"`` (bubblewrap >= 0.7): new PID, network, IPC, UTS (and cgroup) namespaces, its own
  mount namespace with ``/`` bound read-only, a fresh ``/dev`` and ``/proc``, an empty read-only
  tmpfs over ``/tmp`` and ``$HOME`` (the Python installation bound back read-only where it lies
  under them or, for root, under a directory others cannot enter, e.g. ``/root/.pyenv``), and a
  64 MiB tmpfs ``/tmp/kvj-box`` as cwd, ``HOME`` and ``TMPDIR``: the only writable place. As
  root, U drops to a fresh uid per check (``0x71000000 + random``; no groups, no capabilities),
  so ``RLIMIT_NPROC`` counts only this check's processes and root-only files stay unreadable;
  as another user, an unprivileged user namespace (no capabilities, no nested user namespaces;
  ``RLIMIT_NPROC`` is counted per user namespace). ``no_new_privs`` is set;
* ``"unshare"`` (util-linux ``unshare``, when bubblewrap is missing or fails): the same layout
  built by the trusted start of U itself (``mount(2)`` via ctypes: every mount remounted
  read-only, the tmpfs masks, a fresh ``/proc``, then checked) as PID 1 of the new namespaces
  (plus a user namespace when not root), which forks the child that drops privileges (root: the
  per-check uid; otherwise: every capability, the bounding set, ``SECBIT_NOROOT`` locked) and
  runs the program, while PID 1 reaps and finally ends the namespace;
* ``"none"``: no OS isolation (only the limits and the guard below). Refused unless the caller
  passes ``unsafe_exec=True`` (``require_isolation``): the CLI's ``--unsafe-exec``.

In both isolated levels U is killed with its whole PID namespace when its first process ends or
the check times out, so forked or double-forked stragglers never outlive the check. The trusted
start of U also sets ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU`` = ``ceil(timeout_s) + 1``,
``RLIMIT_FSIZE`` = ``fsize_mb`` (also bounds its captured stdout/stderr), ``RLIMIT_NOFILE``
= 256, ``RLIMIT_CORE`` = 0, ``RLIMIT_NPROC`` = 64 (isolated levels); stdin is ``/dev/null``;
and installs a guard (process-creating and signalling functions of ``os``/``subprocess`` raise
``PermissionError``): a speed bump for careless code, not a boundary. Both interpreters start
with ``-I -S`` (U then adds the site-packages folders; ``.pth`` files are not run). Not covered:
kernel bugs (no seccomp filter), reading world-readable files, the 64 MiB work dir counting
against the caller's memory.

Verdicts (``SandboxResult.status``): ``"passed"``, ``"failed"`` (an assertion or exception, an
exit before the end), ``"timeout"`` (wall clock or CPU), ``"memory"`` (``MemoryError`` under
``RLIMIT_AS``), ``"error"`` (did not compile, killed by a signal, or the sandbox could not start).
"""

from __future__ import annotations

import functools
import json
import marshal
import math
import os
import re
import secrets
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "SandboxUnavailable", "run_untrusted", "check_humaneval", "extract_code",
           "build_humaneval_program", "isolation_level", "require_isolation", "level_available", "LEVELS"]

LEVELS = ("bwrap", "unshare", "none")
UNAVAILABLE_MESSAGE = ("no sandbox isolation available (install bubblewrap: apt-get install bubblewrap); "
                       "pass --unsafe-exec to grade untrusted code without isolation")
BOX = "/tmp/kvj-box"  # U's cwd/HOME/TMPDIR inside the isolated levels (a private tmpfs)
_BOX_BYTES = 64 << 20
_NPROC = 64
_UID_BASE, _UID_SPAN = 0x71000000, 1 << 24
_OUTPUT_HEAD = 4096
_OUTPUT_TAIL = 4096
_EXC_MARK = "__KVJUDGE_SANDBOX_EXC__"
_SETUP_MARK = "__KVJUDGE_SANDBOX_SETUP__"
_SETUP_EXIT = 97


class SandboxUnavailable(ValueError):
    """No OS isolation here and the caller did not accept running code without it."""


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


# --- U: the untrusted side ----------------------------------------------------------------------
# ``python -I -S -c _UNTRUSTED CONFIG`` (marshal, hex). Everything above the guard is trusted set-up
# code that runs before any candidate code; nothing in this process is secret. The set-up failure
# mark and exit status are ``_SETUP_MARK`` / ``_SETUP_EXIT``, the exception mark ``_EXC_MARK``.
_UNTRUSTED = r'''
import os, sys, marshal, struct, pickle, resource, builtins
_cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
_level = _cfg["level"]

def _setup_fail(msg):
    try:
        os.write(2, ("\n__KVJUDGE_SANDBOX_SETUP__ %s\n" % (msg,)).encode("utf-8", "replace"))
    finally:
        os._exit(97)

def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def prctl(*args):
        if libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "prctl%r: %s" % (args, os.strerror(e)))
    return ctypes, libc, prctl

def _mountinfo():
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            f = line.split()
            out.append((f[4].encode().decode("unicode_escape"), f[5].split(",")))
    return out

def _unshare_init(cfg):
    # PID 1 of the new namespaces, still privileged: build the filesystem view, then fork the child.
    ctypes, libc, prctl = _libc()
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    def mount(src, dst, fs, flags, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fs), flags, enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "mount %s: %s" % (dst, os.strerror(e)))
    RO, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    keep = {"nodev": NODEV, "noexec": NOEXEC, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    os.umask(0o022)
    mount(None, "/", None, REC | PRIVATE)
    plan = cfg["plan"]
    fds = [(p, os.open(p, os.O_PATH)) for p in plan["binds"]]
    for mp, opts in _mountinfo():
        flags = REMOUNT | BIND | RO | NOSUID
        for o in opts:
            flags |= keep.get(o, 0)
        try:
            mount(None, mp, None, flags)
        except OSError:
            pass  # checked below
    for mask in plan["masks"]:
        mount("tmpfs", mask, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
        for p, fd in fds:
            if p == mask or p.startswith(mask.rstrip("/") + "/"):
                src = "/proc/self/fd/%d" % fd
                if os.path.isdir(src):
                    os.makedirs(p, 0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
                    open(p, "a").close()
                mount(src, p, None, BIND | REC)
        if mask == "/tmp":
            os.makedirs(cfg["workdir"], 0o755)
            mount("tmpfs", cfg["workdir"], "tmpfs", NOSUID | NODEV,
                  "mode=0700,size=%d,uid=%d,gid=%d" % (cfg["box_bytes"], cfg["uid"], cfg["uid"]))
        mount(None, mask, None, REMOUNT | BIND | RO | NOSUID | NODEV)
    for _, fd in fds:
        os.close(fd)
    mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
    tops = {}
    for mp, opts in _mountinfo():
        tops[mp] = opts
    for mp, opts in tops.items():
        if "ro" not in opts and mp not in ("/proc", cfg["workdir"]) and not mp.startswith("/proc/"):
            raise OSError("mount %s is still writable" % mp)
    os.chdir(cfg["workdir"])
    prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE: the child cannot ptrace this privileged PID 1
    child = os.fork()
    if child == 0:
        return
    for fd in (0, cfg["req"], cfg["resp"]):
        os.close(fd)
    while True:  # reap everything (orphans included) until the child ends, then end the namespace
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
        if pid == child:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))

def _drop(cfg):
    uid = cfg["uid"]
    if uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if _level == "unshare":
        ctypes, libc, prctl = _libc()
        if not uid:  # root of a user namespace: give every capability up for good
            prctl(28, 0x2f, 0, 0, 0)  # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED (+ locks)
            for cap in range(64):
                if libc.prctl(ctypes.c_ulong(24), ctypes.c_ulong(cap), 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    break
            prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
            hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
            if libc.capset(hdr, (ctypes.c_uint32 * 6)()) != 0:
                raise OSError(ctypes.get_errno(), "capset")
        prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if _level != "none":
        st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
        if int(st["CapEff"], 16) or int(st["CapPrm"], 16) or int(st["CapAmb"], 16) or st["NoNewPrivs"].strip() != "1":
            raise OSError("still privileged")
        if uid and os.getuid() != uid:
            raise OSError("uid not dropped")

if _level == "unshare":
    try:
        _unshare_init(_cfg)
    except BaseException as e:
        _setup_fail("namespace set-up: %s" % (e,))
try:
    _drop(_cfg)
except BaseException as e:
    _setup_fail("privilege drop: %s" % (e,))

def _lim(which, value):
    try:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))
    except (ValueError, OSError):
        pass
_lim(resource.RLIMIT_CORE, 0)
_lim(resource.RLIMIT_AS, _cfg["mem"])
_lim(resource.RLIMIT_CPU, _cfg["cpu"])
_lim(resource.RLIMIT_FSIZE, _cfg["fsize"])
_lim(resource.RLIMIT_NOFILE, 256)
if _cfg["nproc"] > 0:
    _lim(resource.RLIMIT_NPROC, _cfg["nproc"])

sys.path.extend(_cfg["path"])
import site
site.setquit()  # exit() / quit(), as in a normal interpreter

_req, _resp = _cfg["req"], _cfg["resp"]
def _readn(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(_req, n - len(buf))
        if not chunk:
            os._exit(0)  # the harness is gone
        buf += chunk
    return buf
def _recv():
    return _readn(struct.unpack(">I", _readn(4))[0])
_ESC = {i: "\\u%04x" % i for i in range(32)}
_ESC.update({34: '\\"', 92: "\\\\"})
def _json(o):  # the replies are lists of lists, strings and booleans
    if isinstance(o, list):
        return "[" + ",".join([_json(x) for x in o]) + "]"
    if o is True or o is False:
        return "true" if o else "false"
    return '"' + o.translate(_ESC) + '"'
def _send(obj):
    data = _json(obj).encode("utf-8", "surrogatepass")
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(_resp, data):]

_src = _recv().decode("utf-8", "surrogatepass")
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
import gc, posix, _signal
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
for _n in ("pthread_kill", "pidfd_send_signal"):  # before ``signal`` copies them
    if hasattr(_signal, _n):
        setattr(_signal, _n, _denied)
if _posixsubprocess is not None:  # what ``subprocess`` forks with
    _posixsubprocess.fork_exec = _denied
del _m, _n, _names, _cfg

def _line(e):
    try:
        return " ".join(str(e).split())[:300]
    except BaseException:
        return ""

def _enc(v, depth=0):
    if depth > 100:
        raise ValueError("nested too deeply")
    if v is None:
        return ["n"]
    if v is True or v is False:
        return ["b", v]
    if isinstance(v, int):
        return ["i", format(int(v), "x")]
    if isinstance(v, float):
        return ["f", repr(float(v))]
    if isinstance(v, complex):
        return ["c", repr(v.real), repr(v.imag)]
    if isinstance(v, str):
        return ["s", str.__str__(v)]
    if isinstance(v, (bytes, bytearray)):
        return ["y", bytes(v).hex()]
    for t, tag in ((list, "l"), (tuple, "t"), (frozenset, "F"), (set, "S")):
        if isinstance(v, t):
            return [tag, [_enc(x, depth + 1) for x in v]]
    if isinstance(v, dict):
        return ["d", [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]]
    if hasattr(type(v), "__index__"):
        return ["i", format(v.__index__(), "x")]
    raise TypeError("returned a %s, not plain data" % type(v).__name__)

_ns = {"__name__": "__main__", "__builtins__": builtins}
def _fail(kind, msg):
    try:
        _ns.clear()
        gc.collect()
    except BaseException:
        pass
    line = (kind + ": " + _line(msg))[:300]
    for act in (lambda: _send(["fail", kind, _line(msg)]),
                lambda: os.write(2, ("\n__KVJUDGE_SANDBOX_EXC__ " + line + "\n").encode("utf-8", "replace"))):
        try:
            act()
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
del _code
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
_send(["ready"])
while True:
    _name, _args, _kwargs = pickle.loads(_recv())
    try:
        if _name not in _ns:
            raise NameError("name %r is not defined" % (_name,))
        _value = _ns[_name](*_args, **_kwargs)
    except SystemExit as _e:
        _send(["exit", _line(_e.code)])
        os._exit(1)
    except BaseException as _e:
        _reply = ["raise", type(_e).__name__, _line(_e)]
    else:
        try:
            _reply = ["ret", _enc(_value)]
        except BaseException as _e:
            _reply = ["bad", _line(_e)]
    _value = _args = _kwargs = None
    _send(_reply)
'''

# --- T: the trusted harness ---------------------------------------------------------------------
# ``python -I -S -c _HARNESS``, config JSON (token, program, tests, pipe fds) on stdin. Never runs
# candidate code; the verdict goes to its original stdout, a pipe to the caller.
_HARNESS = r'''
import os, sys, json, struct, pickle, resource, builtins
_cfg = json.loads(sys.stdin.buffer.read())
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
_verdict = os.dup(1)
os.dup2(2, 1)
if _cfg["undumpable"]:  # without namespaces: no ptrace or /proc/<pid>/mem access by the same user
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    except Exception:
        pass
for _w, _v in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, _cfg["mem"]), (resource.RLIMIT_CPU, _cfg["cpu"]),
               (resource.RLIMIT_FSIZE, _cfg["fsize"])):
    try:
        _h = resource.getrlimit(_w)[1]
        resource.setrlimit(_w, (min(_v, _h) if _h != resource.RLIM_INFINITY else _v, _h))
    except (ValueError, OSError):
        pass
_tok, _req, _resp = _cfg["token"], _cfg["req"], _cfg["resp"]
_MAX = 1 << 25

def _report(status, detail=""):
    try:
        detail = " ".join(str(detail).split())[:300]
    except BaseException:
        detail = ""
    os.write(_verdict, (json.dumps({"token": _tok, "status": status, "detail": detail}) + "\n").encode())
    os._exit(0)

class CandidateError(Exception):
    """An exception of the candidate that is not a builtin exception type."""

class _Dead(BaseException):
    pass

class _Protocol(BaseException):
    pass

_dead = []  # (status, detail) once the candidate has exited

def _readn(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(_resp, min(n - len(buf), 1 << 20))
        if not chunk:
            _dead.append(("died", ""))
            raise _Dead()
        buf += chunk
    return buf

def _recv():
    if _dead:
        raise _Dead()
    (n,) = struct.unpack(">I", _readn(4))
    if n > _MAX:
        raise _Protocol("a reply of %d bytes" % n)
    data = _readn(n)
    try:
        msg = json.loads(data.decode("utf-8", "surrogatepass"))
    except Exception:
        raise _Protocol("an unreadable reply")
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise _Protocol("a malformed reply")
    return msg

def _send(data):
    if _dead:
        raise _Dead()
    data = struct.pack(">I", len(data)) + data
    try:
        while data:
            data = data[os.write(_req, data):]
    except OSError:
        _dead.append(("died", ""))
        raise _Dead()

def _dec(x, depth=0):
    if depth > 100 or not isinstance(x, list) or not x or not isinstance(x[0], str):
        raise ValueError("bad value")
    t, a = x[0], x[1:]
    if t == "n" and not a:
        return None
    if t == "b" and len(a) == 1 and isinstance(a[0], bool):
        return a[0]
    if t == "i" and len(a) == 1 and isinstance(a[0], str) and len(a[0]) <= 1 << 20:
        return int(a[0], 16)
    if t == "f" and len(a) == 1 and isinstance(a[0], str) and len(a[0]) <= 64:
        return float(a[0])
    if t == "c" and len(a) == 2 and all(isinstance(s, str) and len(s) <= 64 for s in a):
        return complex(float(a[0]), float(a[1]))
    if t == "s" and len(a) == 1 and isinstance(a[0], str):
        return a[0]
    if t == "y" and len(a) == 1 and isinstance(a[0], str):
        return bytes.fromhex(a[0])
    if t in ("l", "t", "S", "F", "d") and len(a) == 1 and isinstance(a[0], list):
        if t == "d":
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in a[0]):
                raise ValueError("bad dict")
            return {_dec(k, depth + 1): _dec(v, depth + 1) for k, v in a[0]}
        items = [_dec(v, depth + 1) for v in a[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[t](items)
    raise ValueError("bad value")

def _exc(name, msg):
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(msg)
        except Exception:
            pass
    return CandidateError("%s: %s" % (name, msg))

def _proxy(name):
    def call(*args, **kwargs):
        try:
            data = pickle.dumps((name, args, kwargs), protocol=4)
        except Exception as e:
            raise TypeError("arguments cannot be sent to the candidate: %s" % (e,))
        _send(data)
        msg = _recv()
        if msg[0] == "ret" and len(msg) == 2:
            try:
                return _dec(msg[1])
            except Exception:
                raise _Protocol("a reply that is not plain data")
        if msg[0] == "raise" and len(msg) == 3 and isinstance(msg[1], str) and isinstance(msg[2], str):
            raise _exc(msg[1], msg[2])
        if msg[0] == "bad" and len(msg) == 2 and isinstance(msg[1], str):
            raise CandidateError(msg[1])
        if msg[0] == "exit":
            _dead.append(("failed", "SystemExit: the candidate exited during a call"))
            raise _Dead()
        raise _Protocol("an unexpected reply")
    call.__name__ = call.__qualname__ = name
    return call

try:
    _send(_cfg["code"].encode("utf-8", "surrogatepass"))
    _ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        _prelude = compile(_cfg["prelude"], "<tests prelude>", "exec")
        _tests = compile(_cfg["tests"] or "", "<tests>", "exec")
        exec(_prelude, _ns)
    except BaseException as e:
        _report("error", "the tests could not be set up: %s: %s" % (type(e).__name__, e))
    _msg = _recv()
    if _msg[0] == "fail" and len(_msg) == 3 and isinstance(_msg[1], str):
        _kind = _msg[1]
        if _kind == "MemoryError":
            _report("memory", "MemoryError")
        if _kind.startswith("CompileError "):
            _report("error", "%s: %s" % (_kind[len("CompileError "):], _msg[2]))
        _report("failed", "%s: %s" % (_kind, _msg[2]))
    if _msg != ["ready"]:
        raise _Protocol("an unexpected first reply")
    if _cfg["tests"] is not None:
        for _n in _cfg["expose"]:
            _ns[_n] = _proxy(_n)
        exec(_tests, _ns)
except _Dead:
    pass
except _Protocol as e:
    _report("failed", "the candidate sent %s" % (e,))
except MemoryError:
    _report("memory", "MemoryError")
except BaseException as e:
    if not _dead:
        _report("failed", "%s: %s" % (type(e).__name__, e))
if _dead:
    _report(*_dead[0])
_report("passed", "ok")
'''

# The isolation probe (runs as U's program; %r fields filled in by ``_probe``).
_PROBE = r'''
import os, socket, resource, time, ctypes
box = os.getcwd()
for d in sorted(set([os.path.dirname(box), *%(dirs)r])):
    try:
        open(os.path.join(d, %(name)r), "w").close()
    except OSError:
        continue
    raise AssertionError("wrote in " + d)
open("own-dir-is-writable", "w").close()
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
assert int(st["CapEff"], 16) == 0 and st["NoNewPrivs"].strip() == "1", "privileged"
try:
    open("/etc/shadow", "rb").close()
except OSError:
    pass
else:
    raise AssertionError("read /etc/shadow")
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", %(port)d))
except OSError:
    pass
else:
    raise AssertionError("reached the host loopback")
import json, decimal  # the Python installation is readable after the drop
assert resource.getrlimit(resource.RLIMIT_NPROC)[0] == %(nproc)d, "no process limit"
libc = ctypes.CDLL(None)
n = 0
for _ in range(%(nproc)d + 4):
    pid = libc.fork()
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    if pid < 0:
        break
    n += 1
assert 0 < n < %(nproc)d, "RLIMIT_NPROC not applied as a per-check limit (%%d forks)" %% n
assert len([p for p in os.listdir("/proc") if p.isdigit()]) <= n + 3, "host processes visible"
'''

_level_lock = threading.Lock()
_level_cache: str | None = None
_plan_cache: dict[bool, dict] = {}


def isolation_level() -> str:
    """The best working isolation here, probed once: ``"bwrap"``, ``"unshare"`` or ``"none"``.

    ``KVJUDGE_SANDBOX_ISOLATION`` = ``none`` / ``bwrap`` / ``unshare`` forces one (a forced level
    that fails its probe gives ``"none"``).
    """
    global _level_cache
    with _level_lock:
        if _level_cache is None:
            forced = os.environ.get("KVJUDGE_SANDBOX_ISOLATION", "").strip().lower()
            order = [forced] if forced in LEVELS else ["bwrap", "unshare"]
            _level_cache = next((lv for lv in order if lv != "none" and level_available(lv)), "none")
        return _level_cache


def require_isolation(unsafe_exec: bool) -> str:
    """``isolation_level()``; raises ``SandboxUnavailable`` when it is ``"none"`` and not ``unsafe_exec``."""
    level = isolation_level()
    if level == "none" and not unsafe_exec:
        raise SandboxUnavailable(UNAVAILABLE_MESSAGE)
    return level


_available: dict[str, bool] = {}
_available_lock = threading.Lock()


def level_available(level: str) -> bool:
    """Whether ``level`` works here (cached per level): its probe run passed (``"none"``: always)."""
    if level not in LEVELS:
        raise ValueError(f"unknown isolation level {level!r} (choose from {', '.join(LEVELS)})")
    with _available_lock:
        if level not in _available:
            _available[level] = level == "none" or _probe(level)
        return _available[level]


def _probe(level: str) -> bool:
    """Run ``_PROBE`` under ``level`` and check its effects from outside: passed, no file left in
    any host directory it tried, no connection to a listener on the host loopback."""
    if _wrapper(level, False) is None:
        return False
    name = f"kvj-probe-{secrets.token_hex(6)}"
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = sorted({"/", "/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir(), project, os.path.expanduser("~")})
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        code = _PROBE % {"dirs": dirs, "name": name, "port": server.getsockname()[1], "nproc": 8}
        res = _run(level, code, timeout_s=20.0, memory_mb=512, fsize_mb=1, tests=None, prelude="",
                   expose=(), nproc=8)
        try:
            server.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    leaked = [d for d in dirs if os.path.exists(os.path.join(d, name))]
    for d in leaked:
        os.unlink(os.path.join(d, name))
    return res.passed and not reached and not leaked


def _wrapper(level: str, root: bool) -> list[str] | None:
    """The command prefix that puts U into ``level`` (``None``: not installed here)."""
    if level == "none":
        return []
    if level == "bwrap":
        exe = shutil.which("bwrap")
        if exe is None:
            return None
        cmd = [exe, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        if root:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            cmd += ["--unshare-user", *(["--disable-userns"] if _bwrap_has(exe, "--disable-userns") else [])]
        plan = _mount_plan(root)
        for mask in plan["masks"]:
            cmd += ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", mask]
            for p in plan["binds"]:
                if p != mask and p.startswith(mask.rstrip("/") + "/"):
                    rel = os.path.relpath(os.path.dirname(p), mask)
                    parts = [] if rel == "." else rel.split(os.sep)
                    for i in range(1, len(parts) + 1):
                        cmd += ["--perms", "0755", "--dir", os.path.join(mask, *parts[:i])]
                    cmd += ["--ro-bind", p, p]
        cmd += ["--perms", "0777", "--size", str(_BOX_BYTES), "--tmpfs", BOX]
        for mask in plan["masks"]:
            cmd += ["--remount-ro", mask]
        return cmd + ["--remount-ro", "/dev", "--chdir", BOX, "--"]
    exe = shutil.which("unshare")
    if exe is None:
        return None
    cmd = [exe, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private"]
    return cmd + ([] if root else ["--user", "--map-root-user"]) + ["--"]


@functools.lru_cache(maxsize=None)
def _bwrap_has(exe: str, option: str) -> bool:
    """Whether this bubblewrap knows ``option`` (``--disable-userns``: 0.8+; ``--size``, needed, 0.7+)."""
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return option in out.stdout + out.stderr


def _mount_plan(root: bool) -> dict:
    """Directories hidden behind an empty read-only tmpfs (``masks``: ``/tmp``, ``$HOME``, and as
    root every outermost directory others cannot enter that holds part of the Python installation)
    and the installation paths bound back read-only into them (``binds``)."""
    if root in _plan_cache:
        return _plan_cache[root]
    needed: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
              os.path.dirname(os.path.realpath(sys.executable)), *_site_dirs()):
        if p and os.path.exists(p):
            needed.update({os.path.abspath(p), os.path.realpath(p)})
    masks = {"/tmp"}
    home = os.path.realpath(os.path.expanduser("~"))
    if home != "/" and os.path.isdir(home):
        masks.add(home)
    if root:
        for p in needed:
            cur = "/"
            for part in p.strip("/").split("/"):
                cur = os.path.join(cur, part)
                try:
                    if os.path.isdir(cur) and not os.stat(cur).st_mode & stat.S_IXOTH:
                        masks.add(cur)
                        break
                except OSError:
                    break
    inside = lambda a, b: a != b and a.startswith(b.rstrip("/") + "/")  # noqa: E731  (a strictly inside b)
    masks = {m for m in masks if not any(m == n or inside(m, n) for n in needed)}  # never hide a needed path whole
    masks_list = sorted(m for m in masks if not any(inside(m, o) for o in masks))
    under = [p for p in needed if any(inside(p, m) for m in masks_list)]
    binds = sorted(p for p in under if not any(inside(p, o) for o in under))
    _plan_cache[root] = {"masks": masks_list, "binds": binds}
    return _plan_cache[root]


def _site_dirs() -> list[str]:
    """The site-packages folders U adds to ``sys.path`` (it starts with ``-S``: no ``.pth`` files run,
    which saves most of the interpreter start-up)."""
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _pick_uid() -> int:
    """A fresh uid for one check as root (``RLIMIT_NPROC`` then counts only its processes); 65534
    where the high range is not mapped (a user namespace)."""
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
    try:
        with open("/proc/self/uid_map") as fh:
            ranges = [tuple(int(x) for x in line.split()) for line in fh if line.strip()]
    except OSError:
        return uid
    mapped = lambda u: any(inside <= u < inside + count for inside, _, count in ranges)  # noqa: E731
    return uid if mapped(uid) else 65534


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
        level = require_isolation(unsafe_exec)
    elif not level_available(level):
        raise SandboxUnavailable(f"isolation level {level!r} is not available here")
    elif level == "none" and not unsafe_exec:
        raise SandboxUnavailable(UNAVAILABLE_MESSAGE)
    return _run(level, code, timeout_s, memory_mb, fsize_mb, tests, tests_prelude, tuple(expose), _NPROC)


def _run(level: str, code: str, timeout_s: float, memory_mb: int, fsize_mb: int, tests: str | None,
         prelude: str, expose: tuple[str, ...], nproc: int) -> SandboxResult:
    """One check: start the untrusted process and the trusted harness, wire their pipes, wait, kill
    what is left and read the verdict. Long on purpose: every process and pipe it opens is closed
    in the same function, so nothing can outlive a check on any path."""
    root = os.geteuid() == 0
    wrapper = _wrapper(level, root)
    if wrapper is None:
        return SandboxResult(False, "error", f"isolation level {level} is not installed", 0.0)
    token = secrets.token_hex(16)
    cpu = int(math.ceil(timeout_s)) + 1
    mem, fsize = int(memory_mb) << 20, int(fsize_mb) << 20
    with tempfile.TemporaryDirectory(prefix="kvj-out-") as outdir, \
            tempfile.TemporaryDirectory(prefix="kvj-box-", ignore_cleanup_errors=True) as hostbox:
        workdir = hostbox if level == "none" else BOX
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        ucfg = {"level": level, "uid": _pick_uid() if root and level != "none" else 0, "mem": mem, "cpu": cpu,
                "fsize": fsize, "nproc": nproc if level != "none" else 0, "req": req_r, "resp": resp_w,
                "workdir": workdir, "box_bytes": _BOX_BYTES,
                "plan": _mount_plan(root) if level == "unshare" else None, "path": _site_dirs()}
        tcfg = {"token": token, "code": code, "prelude": prelude, "tests": tests, "expose": list(expose),
                "req": req_w, "resp": resp_r, "mem": max(mem, 1 << 30), "cpu": cpu, "fsize": fsize,
                "undumpable": level == "none"}
        paths = {k: os.path.join(outdir, k) for k in ("out", "err", "terr")}
        start = time.perf_counter()
        u = t = None
        try:
            with open(paths["out"], "wb") as uout, open(paths["err"], "wb") as uerr, open(paths["terr"], "wb") as terr:
                ucmd = [*wrapper, sys.executable, "-I", "-S", "-c", _UNTRUSTED, marshal.dumps(ucfg).hex()]
                u = subprocess.Popen(ucmd,
                                     stdin=subprocess.DEVNULL, stdout=uout, stderr=uerr,
                                     cwd=workdir if level == "none" else outdir, env=_base_env(workdir),
                                     close_fds=True, pass_fds=(req_r, resp_w), start_new_session=True)
                t = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HARNESS], stdin=subprocess.PIPE,
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


def _humaneval_body(problem: dict, completion: str) -> str:
    entry = problem["entry_point"]
    code = extract_code(completion, entry)
    if _defines(code, entry):
        return problem["prompt"] + "\n\n" + textwrap.dedent(code)
    return problem["prompt"] + code


def _humaneval_tests(problem: dict) -> str:
    return problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def build_humaneval_program(problem: dict, completion: str) -> str:
    """The single-file program equivalent to one HumanEval check (for display and reuse).

    Standard form: ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.
    When the (fence-stripped) completion restates ``def entry_point(`` itself — what chat models
    do — the body is ``prompt + "\\n\\n" + dedent(completion)`` instead: the prompt's function
    is docstring-only and therefore valid, the completion's later ``def`` replaces it, and the
    prompt's imports and helper functions (e.g. HumanEval/38, /50) stay available.
    ``check_humaneval`` runs the body in the sandbox and the test part in the trusted harness.
    """
    return _humaneval_body(problem, completion) + "\n\n" + _humaneval_tests(problem)


def check_humaneval(problem: dict, completion: str, timeout_s: float = 5.0, memory_mb: int = 512, *,
                    unsafe_exec: bool = False) -> SandboxResult:
    """Run ``problem``'s unit tests on ``completion``: the body of ``build_humaneval_program`` in
    the sandbox, ``test`` + ``check(entry_point)`` (after the prompt, for its helpers) in the
    trusted harness, calling the sandboxed ``entry_point``."""
    return run_untrusted(_humaneval_body(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb,
                         tests=_humaneval_tests(problem), tests_prelude=problem["prompt"],
                         expose=(problem["entry_point"],), unsafe_exec=unsafe_exec)
