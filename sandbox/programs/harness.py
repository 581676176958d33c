"""T, the trusted harness of a check: ``python -I -S -c <this file>``, config JSON (token, program,
tests, pipe fds) on stdin. Never runs candidate code: it sends the program to U, runs the tests with
proxies that call U, and writes the verdict (with the token) to its original stdout, a pipe to the
caller. Standard library only.
"""

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
