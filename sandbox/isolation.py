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
import sysconfig
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
    """Run ``programs/probe.py`` under ``level`` and check its effects from outside: passed (which
    includes: no hidden file readable, no site-packages on ``sys.path``), no file left in any host
    directory it tried, no connection to a listener on the host loopback."""
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
        params = {"dirs": dirs, "name": name, "port": server.getsockname()[1], "nproc": _PROBE_NPROC,
                  "hidden": mount_plan(os.geteuid() == 0)["sentinels"]}
        source = program("probe")
        marker = "PARAMS: dict = {}"
        if marker not in source:
            raise RuntimeError("sandbox/programs/probe.py lost its PARAMS line")
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


def interpreter() -> str:
    """The Python that runs U: the real file behind ``sys.executable`` (a virtual environment's
    ``python`` is a link into a folder the candidate must not see, and U needs none of its packages)."""
    return os.path.realpath(sys.executable)


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
        steps = mount_plan(root)["steps"]
        for kind, path, base in steps:
            if kind == "tmpfs":
                cmd += ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", path]
                continue
            rel = os.path.relpath(os.path.dirname(path), base)
            parts = [] if rel == "." else rel.split(os.sep)
            for i in range(1, len(parts) + 1):
                cmd += ["--perms", "0755", "--dir", os.path.join(base, *parts[:i])]
            cmd += ["--ro-bind", path, path]
        cmd += ["--perms", "0777", "--size", str(BOX_BYTES), "--tmpfs", BOX]
        for kind, path, _ in steps:
            if kind == "tmpfs":
                cmd += ["--remount-ro", path]
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


# Never hidden whole (the system and the interpreter's shared libraries live there): a folder to hide
# that is one of these or holds one stays visible.
_SYSTEM = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib32",
           "/usr/lib64", "/usr/libexec", "/usr/share", "/etc", "/dev", "/proc", "/sys", "/run", "/var", "/tmp")


def _inside(a: str, b: str) -> bool:
    """Whether path ``a`` lies strictly inside folder ``b``."""
    return a != b and a.startswith(b.rstrip("/") + "/")


def python_paths() -> list[str]:
    """What U's interpreter needs, as real paths: its executable, its shared library (if built
    with one) and its standard library (``lib-dynload`` included); nothing of ``site-packages``."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}
    found = [interpreter(), sysconfig.get_path("stdlib", vars=base), sysconfig.get_path("platstdlib", vars=base)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
        if lib:
            found.append(os.path.join(sysconfig.get_config_var("LIBDIR") or "", lib))
    return sorted({os.path.realpath(p) for p in found if p and os.path.exists(p)})


def hidden_paths() -> list[str]:
    """Folders U must not see (real paths): every ``site-packages`` / ``dist-packages`` of this
    interpreter, of its base installation and of the user, the virtual environment, the project
    (the folder that holds this package: kvjudge's own code), and every other folder on the caller's
    ``sys.path`` outside the standard library (editable installs, ``PYTHONPATH``). ``/`` and the
    system folders (``_SYSTEM``) are never hidden whole; files on ``sys.path`` (zips) are not hidden."""
    found = set(site.getsitepackages()) | set(site.getsitepackages([sys.base_prefix, sys.base_exec_prefix]))
    found |= {site.getusersitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    if sys.prefix != sys.base_prefix or sys.exec_prefix != sys.base_exec_prefix:
        found |= {sys.prefix, sys.exec_prefix}
    found.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    std = python_paths()
    found |= {p for p in sys.path if p and not any(os.path.realpath(p) == s or _inside(os.path.realpath(p), s)
                                                   for s in std)}
    out = set()
    for p in found:
        real = os.path.realpath(p)
        if real == "/" or not os.path.isdir(real):
            continue
        system = {*_SYSTEM, *(os.path.realpath(s) for s in _SYSTEM)}
        if any(real == s or _inside(s, real) for s in system):
            continue
        out.add(real)
    return sorted(out)


def visible(steps: list[tuple[str, str, str]], path: str) -> bool:
    """Whether host ``path`` shows through the plan's ``steps``: the last step on it or on a folder
    above it decides (a tmpfs hides, a bind shows); with none, the read-only ``/`` shows it."""
    last = None
    for kind, p, _ in steps:
        if p == path or _inside(path, p):
            last = kind
    return last != "tmpfs"


def mount_plan(root: bool) -> dict:
    """What U sees of the host: ordered ``steps`` over the read-only ``/``, where ``("tmpfs", dir, dir)``
    covers ``dir`` with an empty tmpfs (read-only once set up) and ``("bind", path, base)`` binds the
    host ``path`` back read-only inside the tmpfs at ``base``; ``sentinels``: host files it hides.

    First ``/tmp`` and ``$HOME`` are covered, and as root every outermost directory others cannot
    enter on the way to the interpreter (the per-check uid could not pass it anyway); then every
    ``hidden_paths()`` folder still visible. Each cover binds back the interpreter's own files
    inside it (``python_paths``), so a base installation's ``site-packages`` inside the bound
    standard library is covered again after it.
    """
    if root in _plan_cache:
        return _plan_cache[root]
    needed = python_paths()
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
    masks = {m for m in masks if not any(m == n or _inside(m, n) for n in needed)}  # never hide a needed path whole
    steps: list[tuple[str, str, str]] = []

    def cover(folder: str) -> None:
        steps.append(("tmpfs", folder, folder))
        inner = [p for p in needed if _inside(p, folder)]
        steps.extend(("bind", p, folder) for p in inner if not any(_inside(p, o) for o in inner))

    for m in sorted(m for m in masks if not any(_inside(m, o) for o in masks)):
        cover(m)
    for h in hidden_paths():  # sorted: a folder comes before the folders inside it
        if visible(steps, h):
            cover(h)
    _plan_cache[root] = {"steps": steps, "sentinels": _sentinels(steps)}
    return _plan_cache[root]


def _sentinels(steps: list[tuple[str, str, str]], per_folder: int = 2) -> list[str]:
    """A few host files (readable by everyone, so by any uid) in each covered folder that the plan hides."""
    out = []
    for kind, folder, _ in steps:
        if kind != "tmpfs" or folder == "/tmp":
            continue
        n = walked = 0
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    readable = stat.S_ISREG(os.stat(p).st_mode) and os.stat(p).st_mode & stat.S_IROTH
                except OSError:
                    readable = False
                if n < per_folder and readable and not visible(steps, p):
                    out.append(p)
                    n += 1
            walked += 1
            if n >= per_folder or walked >= 20:
                break
    return out


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
