"""U, the untrusted side of a check: ``python -I -S -c <this file> CONFIG`` (CONFIG: ``marshal``, hex).

Everything above the guard is trusted set-up code that runs before any candidate code (the ``unshare``
namespace set-up as PID 1, the privilege drop, the limits); nothing in this process is secret. It then
reads the candidate's program from the request pipe, runs it as ``__main__`` and serves calls from the
harness. The set-up failure mark and exit status (``__KVJUDGE_SANDBOX_SETUP__``, 97) and the exception
mark (``__KVJUDGE_SANDBOX_EXC__``) are read back by ``run.py``. Standard library only.
"""

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
    steps = cfg["plan"]  # isolation.mount_plan: [kind, path, base], a tmpfs cover or a bind back into one
    fds = {p: os.open(p, os.O_PATH) for kind, p, _ in steps if kind == "bind"}  # host paths, before any mount
    for mp, opts in _mountinfo():
        flags = REMOUNT | BIND | RO | NOSUID
        for o in opts:
            flags |= keep.get(o, 0)
        try:
            mount(None, mp, None, flags)
        except OSError:
            pass  # checked below
    covers = []
    for kind, p, _ in steps:
        if kind == "tmpfs":
            mount("tmpfs", p, "tmpfs", NOSUID | NODEV, "mode=0755,size=1m")
            covers.append(p)
            continue
        src = "/proc/self/fd/%d" % fds[p]
        if os.path.isdir(src):
            os.makedirs(p, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
            open(p, "a").close()
        mount(src, p, None, BIND | REC)
    os.makedirs(cfg["workdir"], 0o755)  # inside the /tmp cover, still writable here
    mount("tmpfs", cfg["workdir"], "tmpfs", NOSUID | NODEV,
          "mode=0700,size=%d,uid=%d,gid=%d" % (cfg["box_bytes"], cfg["uid"], cfg["uid"]))
    for p in covers:
        mount(None, p, None, REMOUNT | BIND | RO | NOSUID | NODEV)
    for fd in fds.values():
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

# sys.path stays the standard library's (-I -S): no site-packages, no project, no benchmark package
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
