"""The package's floors import one way (ground floor first), and the CLI starts without the heavy stacks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ground floor first; a folder may import its own modules and those of lower floors only
FLOORS = {"cache": 0, "models": 0, "judges": 1, "agents": 1, "topologies": 2, "experiments": 3, "app": 4}


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, kvjudge module)`` for every import of a kvjudge module in ``path`` (anywhere in it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kvjudge.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvjudge"):
            if node.module == "kvjudge":
                out += [(node.lineno, f"kvjudge.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _violations() -> list[str]:
    bad = []
    for folder, floor in FLOORS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _imports(path):
                target = module.split(".")[1]
                if target == folder or target not in FLOORS:
                    continue
                if FLOORS[target] >= floor:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({folder} is floor {floor}, "
                               f"{target} is floor {FLOORS[target]})")
    return bad


def test_every_package_folder_has_a_floor():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders == set(FLOORS), f"give these folders a floor: {folders ^ set(FLOORS)}"


def test_imports_run_one_way():
    assert _violations() == []


def test_the_guard_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "cache"
    fake.mkdir()
    (fake / "bad.py").write_text("from kvjudge.judges.prompt import build_prompt\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setitem(FLOORS, "cache", 0)
    found = [v for v in _violations() if "bad.py" in v]
    assert found and "cache is floor 0, judges is floor 1" in found[0]


@pytest.mark.parametrize("argv", [["--help"], ["validate", "progressive_refinement"], ["run", "--help"]])
def test_cli_starts_without_torch_transformers_or_ray(argv):
    code = ("import sys; from kvjudge.app.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray'))\n"
            "print('HEAVY', heavy[:5])\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
