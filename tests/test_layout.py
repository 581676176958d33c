"""The package's floors import one way (ground floor first), and the CLI starts without the heavy stacks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ground floor first; a folder may import its own modules and those of lower floors only
FLOORS = {"cache": 0, "models": 0, "sandbox": 0, "judges": 1, "agents": 1, "topologies": 2, "runtime": 3,
          "experiments": 4, "app": 5}
# self-contained folders: they import no kvjudge module outside themselves, not even from a lower floor
STANDALONE = {"sandbox"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, kvjudge module)`` for every import of a kvjudge module in ``path`` (anywhere in it);
    relative imports are resolved against ``path``'s place in the package (``ROOT`` is ``kvjudge``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ["kvjudge", *path.parent.relative_to(ROOT).parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kvjudge.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level <= len(package) else []
                module = ".".join([*base, *([module] if module else [])])
            if module == "kvjudge":
                out += [(node.lineno, f"kvjudge.{a.name}") for a in node.names]
            elif module.startswith("kvjudge."):
                out.append((node.lineno, module))
            elif node.level:  # above the package root
                out.append((node.lineno, "kvjudge.." + module))
    return out


def _violations() -> list[str]:
    bad = []
    for folder, floor in FLOORS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, module in _imports(path):
                target = module.split(".")[1]
                if target == folder:
                    continue
                if folder in STANDALONE:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({folder} imports nothing "
                               f"from kvjudge outside itself)")
                    continue
                if target not in FLOORS:
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


@pytest.mark.parametrize("folder, line, floor_msg", [
    ("sandbox", "from kvjudge.experiments.data import load_humaneval\n", "sandbox imports nothing"),  # up
    ("sandbox", "import kvjudge.cache.store\n", "sandbox imports nothing"),  # sideways, same floor
    ("sandbox", "from kvjudge import models\n", "sandbox imports nothing"),
    ("sandbox", "from ...experiments import datasets\n", "imports kvjudge.experiments"),  # relative, from sandbox/sub/: up
    ("cache", "from ...judges.prompt import build_prompt\n", "cache is floor 0, judges is floor 1"),
    ("judges", "from kvjudge.agents import generate\n", "judges is floor 1, agents is floor 1"),  # sideways
    ("topologies", "from kvjudge.runtime.runner import run\n", "topologies is floor 2, runtime is floor 3"),  # up
    ("runtime", "from kvjudge.experiments.protocol import evaluate\n", "runtime is floor 3, experiments is floor 4"),
    ("runtime", "from ...app import render\n", "runtime is floor 3, app is floor 5"),  # relative, up
    ("experiments", "import kvjudge.app.cli\n", "experiments is floor 4, app is floor 5"),
])
def test_the_guard_catches_imports_that_go_up_or_sideways(tmp_path, monkeypatch, folder, line, floor_msg):
    fake = tmp_path / folder / "sub"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text(line)
    (tmp_path / folder / "fine.py").write_text("from . import sub\nfrom .sub import bad\nimport os\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _violations()
    assert [v for v in found if "bad.py" in v and floor_msg in v], found
    assert not [v for v in found if "fine.py" in v], found


def test_the_runtime_floor_sits_between_topologies_and_experiments():
    assert FLOORS["topologies"] < FLOORS["runtime"] < FLOORS["experiments"]
    # the topology definition needs no runtime: no module of topologies/ imports Ray
    for path in sorted((ROOT / "topologies").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("ray", "torch")], path


def test_sandbox_imports_nothing_from_kvjudge():
    found = [(p.relative_to(ROOT), line, m) for p in sorted((ROOT / "sandbox").rglob("*.py"))
             for line, m in _imports(p) if not m.startswith("kvjudge.sandbox")]
    assert found == []
    assert (ROOT / "sandbox" / "programs" / "untrusted.py").is_file()  # the rglob above saw the programs too


@pytest.mark.parametrize("argv", [["--help"], ["validate", "progressive_refinement"], ["run", "--help"]])
def test_cli_starts_without_torch_transformers_or_ray(argv):
    code = ("import sys; from kvjudge.app.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray'))\n"
            "print('HEAVY', heavy[:5])\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
