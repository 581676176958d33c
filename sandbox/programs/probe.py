"""The isolation probe: run as the candidate's program by ``isolation._probe``, whose effects are then
checked again from outside. Any failed check raises, so the run is not "passed".

``PARAMS`` is replaced by the caller before the run (``dirs``: host directories it must not write in;
``name``: the file name it tries there; ``port``: a host loopback listener; ``nproc``: the process limit;
``hidden``: host files the mount plan hides: site-packages, the project, ...).
"""

import ctypes
import decimal  # noqa: F401  (the Python installation is readable after the drop)
import json  # noqa: F401
import os
import resource
import socket
import sys
import time

PARAMS: dict = {}  # filled in at run time

box = os.getcwd()
for d in sorted({os.path.dirname(box), *PARAMS["dirs"]}):
    try:
        open(os.path.join(d, PARAMS["name"]), "w").close()
    except OSError:
        continue
    raise AssertionError("wrote in " + d)
open("own-dir-is-writable", "w").close()
st = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
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
    s.connect(("127.0.0.1", PARAMS["port"]))
except OSError:
    pass
else:
    raise AssertionError("reached the host loopback")
for path in PARAMS["hidden"]:
    try:
        open(path, "rb").close()
    except OSError:
        continue
    raise AssertionError("read " + path)
assert not [p for p in sys.path if "site-packages" in p or "dist-packages" in p], "site-packages on sys.path"
nproc = PARAMS["nproc"]
assert resource.getrlimit(resource.RLIMIT_NPROC)[0] == nproc, "no process limit"
libc = ctypes.CDLL(None)
n = 0
for _ in range(nproc + 4):
    pid = libc.fork()
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    if pid < 0:
        break
    n += 1
assert 0 < n < nproc, "RLIMIT_NPROC not applied as a per-check limit (%d forks)" % n
assert len([p for p in os.listdir("/proc") if p.isdigit()]) <= n + 3, "host processes visible"
