"""``kvjudge env`` and the tested dependency set (``.ci/constraints.txt``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from kvjudge.app import envinfo
from kvjudge.app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    """Independent reading of a constraints file: ``name==version`` lines, names normalised."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)\s*(#.*)?", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return out


def test_tested_set_lies_in_pyproject_ranges():
    """Every dependency pyproject.toml declares is pinned, inside its range; no data package is pinned."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pins = _pins(ROOT / ".ci" / "constraints.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{name} is not in the tested set"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
    data = [l.split("==")[0] for l in (ROOT / ".ci" / "data-packages.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    assert data and not set(data) & set(pins)
    assert "kvjudge" not in pins and not any("+" in v for v in pins.values())


def test_env_json_reports_what_is_installed(capsys):
    import torch
    import transformers

    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    pins = _pins(ROOT / ".ci" / "constraints.txt")
    rows = info["packages"]
    assert rows["transformers"]["installed"] == transformers.__version__
    assert rows["torch"]["installed"] == torch.__version__
    assert rows["transformers"]["tested"] == pins["transformers"]
    assert rows["transformers"]["match"] == (transformers.__version__ == pins["transformers"])
    assert rows["torch"]["match"] == (torch.__version__.split("+")[0] == pins["torch"])
    assert info["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert info["constraints"]["pins"] == len(pins)
    assert info["device"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert info["device"]["dtype"] == "float32"
    assert info["sandbox"]["isolation"] in ("bwrap", "unshare", "none")


def test_constraints_check_names_what_differs_and_what_is_missing(tmp_path):
    from importlib import metadata

    have = metadata.version("pytest")
    path = tmp_path / "c.txt"
    path.write_text(f"# header\npytest=={have}\nPyYAML==0.0.1  # a comment\nno-such-dist-kvj==1.0\n")
    pins = envinfo.read_constraints(path)
    assert pins == {"pytest": have, "pyyaml": "0.0.1", "no-such-dist-kvj": "1.0"}
    check = envinfo.constraints_check(pins, path)
    assert check["match"] is False and check["pins"] == 3
    assert check["differ"] == {"pyyaml": {"installed": metadata.version("PyYAML"), "tested": "0.0.1"}}
    assert check["missing"] == {"no-such-dist-kvj": "1.0"}
    ok = envinfo.constraints_check({"pytest": have}, path)
    assert ok["match"] is True and not ok["differ"] and not ok["missing"]
    assert envinfo.read_constraints(tmp_path / "absent.txt") is None
    assert envinfo.constraints_check(None)["file"] is None


def test_env_lists_converted_models_in_kvjudge_cache(tmp_path, monkeypatch, capsys):
    done = tmp_path / "models" / "done-model"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"x" * 3000)
    (done / envinfo.MODEL_MARKER).write_text("{}")
    (tmp_path / "models" / "half-model").mkdir()
    (tmp_path / "models" / ".half-model-tmp").mkdir()  # a conversion in flight: not a model
    monkeypatch.setenv("KVJUDGE_CACHE", str(tmp_path))
    info = envinfo.cache_info()
    assert info["root"] == str(tmp_path) and info["from_env"] and info["exists"]
    assert [(m["name"], m["complete"]) for m in info["models"]] == [("done-model", True), ("half-model", False)]
    assert info["models"][0]["bytes"] == 3000 + 2
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {tmp_path} ($KVJUDGE_CACHE)" in out
    assert "half-model: 0.0 MiB, INCOMPLETE" in out and "done-model: 0.0 MiB\n" in out
    for name in ("torch", "transformers", "ray"):
        assert re.search(rf"^{name}: \d", out, re.M), out
    assert re.search(r"^device: (cpu float32|cuda:?\d* \w+)", out, re.M), out


def test_render_marks_a_differing_version():
    info = envinfo.collect()
    info["packages"]["transformers"] = {"installed": "5.24.0", "tested": "5.23.0", "match": False}
    info["constraints"] = {"file": "c.txt", "pins": 2, "match": False,
                           "differ": {"transformers": {"installed": "5.24.0", "tested": "5.23.0"}},
                           "missing": {"gguf": "0.19.0"}}
    text = envinfo.render(info)
    assert "transformers: 5.24.0 (tested 5.23.0: DIFFERS)" in text
    assert "installed versions DIFFER" in text and "  gguf: not installed (tested 0.19.0)" in text


@pytest.mark.parametrize("argv", [["--help"], ["env", "--help"]])
def test_help_imports_no_heavy_stack(argv):
    code = ("import sys; from kvjudge.app.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray'))[:5])\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "env" in proc.stdout
