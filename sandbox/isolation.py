"""How the candidate's process is isolated: the levels, their probe, the wrapper command that enters
one, the mount plan (what is hidden behind empty tmpfs and what is bound back), and the uid of a check.

``isolation_level()`` probes once with a real sandboxed run of ``programs/probe.py`` whose effects are
checked from outside; see the package docstring for what each level gives.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import site
import socket
import stat
import subprocess
import sys
import tempfile
import threading

LEVELS = ("bwrap", "unshare", "none")
UNAVAILABLE_MESSAGE = ("no sandbox isolation available (install bubblewrap: apt-get install bubblewrap); "
                       "pass --unsafe-exec to grade untrusted code without isolation")
BOX = "/tmp/kvj-box"  # U's cwd/HOME/TMPDIR inside the isolated levels (a private tmpfs)
BOX_BYTES = 64 << 20
_UID_BASE, _UID_SPAN = 0x71000000, 1 << 24
_PROBE_NPROC = 8


class SandboxUnavailable(ValueError):
    """No OS isolation here and the caller did not accept running code without it."""


_level_lock = threading.Lock()
_level_cache: str | None = None
_plan_cache: dict[bool, dict] = {}
_available: dict[str, bool] = {}
_available_lock = threading.Lock()


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


def level_available(level: str) -> bool:
    """Whether ``level`` works here (cached per level): its probe run passed (``"none"``: always)."""
    if level not in LEVELS:
        raise ValueError(f"unknown isolation level {level!r} (choose from {', '.join(LEVELS)})")
    with _available_lock:
        if level not in _available:
            _available[level] = level == "none" or _probe(level)
        return _available[level]


def _probe(level: str) -> bool:
    """Run ``programs/probe.py`` under ``level`` and check its effects from outside: passed, no file
    left in any host directory it tried, no connection to a listener on the host loopback."""
    from .run import execute, program  # run.py imports this module; the probe is its one way back

    if wrapper(level, False) is None:
        return False
    name = f"kvj-probe-{secrets.token_hex(6)}"
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = sorted({"/", "/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir(), project, os.path.expanduser("~")})
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        params = {"dirs": dirs, "name": name, "port": server.getsockname()[1], "nproc": _PROBE_NPROC}
        source = program("probe")
        marker = "PARAMS: dict = {}"
        assert marker in source, "programs/probe.py lost its PARAMS line"
        code = source.replace(marker, f"PARAMS: dict = {params!r}", 1)
        res = execute(level, code, timeout_s=20.0, memory_mb=512, fsize_mb=1, tests=None, prelude="",
                      expose=(), nproc=_PROBE_NPROC)
        try:
            server.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    leaked = [d for d in dirs if os.path.exists(os.path.join(d, name))]
    for d in leaked:
        os.unlink(os.path.join(d, name))
    return res.passed and not reached and not leaked


def wrapper(level: str, root: bool) -> list[str] | None:
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
        plan = mount_plan(root)
        for mask in plan["masks"]:
            cmd += ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", mask]
            for p in plan["binds"]:
                if p != mask and p.startswith(mask.rstrip("/") + "/"):
                    rel = os.path.relpath(os.path.dirname(p), mask)
                    parts = [] if rel == "." else rel.split(os.sep)
                    for i in range(1, len(parts) + 1):
                        cmd += ["--perms", "0755", "--dir", os.path.join(mask, *parts[:i])]
                    cmd += ["--ro-bind", p, p]
        cmd += ["--perms", "0777", "--size", str(BOX_BYTES), "--tmpfs", BOX]
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


def mount_plan(root: bool) -> dict:
    """Directories hidden behind an empty read-only tmpfs (``masks``: ``/tmp``, ``$HOME``, and as
    root every outermost directory others cannot enter that holds part of the Python installation)
    and the installation paths bound back read-only into them (``binds``)."""
    if root in _plan_cache:
        return _plan_cache[root]
    needed: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
              os.path.dirname(os.path.realpath(sys.executable)), *site_dirs()):
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


def site_dirs() -> list[str]:
    """The site-packages folders U adds to ``sys.path`` (it starts with ``-S``: no ``.pth`` files run,
    which saves most of the interpreter start-up)."""
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def pick_uid() -> int:
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
