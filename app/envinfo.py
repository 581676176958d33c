"""``kvjudge env``: what a user pastes into a bug report (versions, tested set, device, sandbox, model cache).

Versions come from installed distributions' metadata (``importlib.metadata``: nothing heavy is
imported for them); the tested set is ``.ci/constraints.txt`` of the repository the package runs
from (absent for an install without the repository). Only the device section imports torch, and
the sandbox section probes the isolation level the way a graded run does.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the kvjudge package
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "ray", "huggingface-hub", "accelerate", "gguf", "numpy",
                "pydantic")
MODEL_MARKER = "kvjudge-complete.json"  # written last by a finished conversion (models/smollm2.py)


def canon(name: str) -> str:
    """A distribution name in its normalised form (PEP 503): ``Huggingface_Hub`` -> ``huggingface-hub``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> str:
    """A version without its local build label: ``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str] | None:
    """``{name: version}`` of the ``name==version`` lines of a constraints file (``None`` if there is none)."""
    if not path.is_file():
        return None
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canon(name)] = version.strip()
    return pins


def package_rows(pins: dict[str, str] | None, names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, dict]:
    """Per key package: installed version, tested version (pin) and whether they match (``None``: no pin)."""
    rows = {}
    for name in names:
        have, want = installed(name), (pins or {}).get(canon(name))
        rows[name] = {"installed": have, "tested": want,
                      "match": None if want is None else (have is not None and release(have) == want)}
    return rows


def constraints_check(pins: dict[str, str] | None, path: Path = CONSTRAINTS) -> dict[str, Any]:
    """The whole tested set against what is installed: counts, and every pin that differs or is missing."""
    if pins is None:
        return {"file": None, "note": "no .ci/constraints.txt (installed without the repository)"}
    differ, missing = {}, {}
    for name, want in sorted(pins.items()):
        have = installed(name)
        if have is None:
            missing[name] = want
        elif release(have) != want:
            differ[name] = {"installed": have, "tested": want}
    return {"file": str(path), "pins": len(pins), "match": not differ and not missing, "differ": differ,
            "missing": missing}


def device_info() -> dict[str, Any]:
    """torch's view: the device and dtype kvjudge picks (CUDA + bf16 when available, CPU fp32 otherwise)."""
    try:
        import torch

        from kvjudge.models.base import default_device, default_dtype
    except Exception as exc:  # a broken torch install is exactly what this command must report
        return {"error": f"torch does not import: {type(exc).__name__}: {exc}"}
    dev = default_device()
    info: dict[str, Any] = {"device": str(dev), "dtype": str(default_dtype(dev)).removeprefix("torch."),
                            "cuda_available": torch.cuda.is_available(), "cuda_build": torch.version.cuda,
                            "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def sandbox_info() -> dict[str, Any]:
    """The isolation level graded code would run under (``bwrap``, ``unshare`` or ``none``)."""
    import importlib
    import shutil

    level = None
    for module in ("kvjudge.sandbox", "kvjudge.sandbox.isolation"):
        try:
            probe = getattr(importlib.import_module(module), "isolation_level", None)
        except ImportError:
            continue
        if probe is not None:
            try:
                level = probe()
            except Exception as exc:
                level = f"unknown ({type(exc).__name__}: {exc})"
            break
    return {"isolation": level or "unknown (no sandbox module)", "bwrap": shutil.which("bwrap")}


def cache_root() -> Path:
    """``$KVJUDGE_CACHE`` (default ``~/.cache/kvjudge``), as ``kvjudge.models.smollm2.cache_root`` (repeated:
    that module imports torch)."""
    return Path(os.environ.get("KVJUDGE_CACHE", Path.home() / ".cache" / "kvjudge")).expanduser()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cache_info(root: Path | None = None) -> dict[str, Any]:
    """The cache folder and the converted models in it (``complete``: the conversion finished)."""
    root = root or cache_root()
    models = []
    folder = root / "models"
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            models.append({"name": sub.name, "path": str(sub), "complete": (sub / MODEL_MARKER).is_file(),
                           "bytes": _size(sub)})
    return {"root": str(root), "from_env": "KVJUDGE_CACHE" in os.environ, "exists": root.is_dir(), "models": models}


def collect() -> dict[str, Any]:
    """Everything ``kvjudge env`` reports, as plain data."""
    pins = read_constraints()
    return {
        "kvjudge": {"version": installed("kvjudge"), "location": str(ROOT)},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "packages": package_rows(pins),
        "constraints": constraints_check(pins),
        "device": device_info(),
        "sandbox": sandbox_info(),
        "cache": cache_info(),
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render(info: dict[str, Any]) -> str:
    """Plain text, one ``key: value`` per line (for a bug report)."""
    lines = [f"kvjudge: {info['kvjudge']['version']} ({info['kvjudge']['location']})",
             f"python: {info['python']['version']} ({info['python']['executable']})",
             f"platform: {info['python']['platform']}"]
    for name, row in info["packages"].items():
        tested = "" if row["tested"] is None else (
            f" (tested {row['tested']})" if row["match"] else f" (tested {row['tested']}: DIFFERS)")
        lines.append(f"{name}: {row['installed'] or 'not installed'}{tested}")
    c = info["constraints"]
    if c.get("file") is None:
        lines.append(f"tested set: {c['note']}")
    else:
        state = "installed versions match" if c["match"] else "installed versions DIFFER"
        lines.append(f"tested set: {c['file']} ({c['pins']} pins): {state}")
        lines += [f"  {n}: {d['installed']} (tested {d['tested']})" for n, d in c["differ"].items()]
        lines += [f"  {n}: not installed (tested {want})" for n, want in c["missing"].items()]
    d = info["device"]
    if "error" in d:
        lines.append(f"device: {d['error']}")
    else:
        gpus = f", {', '.join(d['gpus'])}" if d.get("gpus") else ""
        lines.append(f"device: {d['device']} {d['dtype']} (CUDA available: {d['cuda_available']}, "
                     f"torch CUDA build: {d['cuda_build']}, {d['threads']} threads{gpus})")
    s = info["sandbox"]
    lines.append(f"sandbox isolation: {s['isolation']} (bwrap: {s['bwrap'] or 'not found'})")
    k = info["cache"]
    where = "$KVJUDGE_CACHE" if k["from_env"] else "default; set $KVJUDGE_CACHE to move it"
    lines.append(f"cache: {k['root']} ({where}{'' if k['exists'] else ', does not exist yet'})")
    if not k["models"]:
        lines.append("  converted models: none")
    for m in k["models"]:
        done = "" if m["complete"] else ", INCOMPLETE (no marker: converted again on next use)"
        lines.append(f"  {m['name']}: {_mib(m['bytes'])}{done}")
    return "\n".join(lines)
