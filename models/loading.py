"""Model loading: a local checkpoint folder of any RoPE causal LM, or a built-in offline alias.

Built-in aliases (no hub, no download): ``tiny-llama`` / ``tiny-qwen2`` (:mod:`.tiny`) and
``smollm2-135m`` (:mod:`.smollm2`). Everything else is a path handed to
``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from kvjudge.models import smollm2
from kvjudge.models.base import LoadedModel, ModelLoadError, default_device, default_dtype
from kvjudge.models.tiny import TINY_CONFIGS, byte_tokenizer, spec_id, tiny_model

REAL_ALIASES = {"smollm2-135m": smollm2.ensure_folder}  # alias -> function returning a checkpoint folder


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load ``spec`` (a built-in alias or a local checkpoint folder) for inference.

    Raises :class:`ModelLoadError` with a one-line message when the spec cannot be loaded.
    """
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    if spec in TINY_CONFIGS:
        model = tiny_model(spec).to(device=dev, dtype=dt)
        return LoadedModel(model, byte_tokenizer(), spec_id(spec, TINY_CONFIGS[spec]), spec)
    if spec in REAL_ALIASES:
        return replace(load_model(str(REAL_ALIASES[spec]()), device=dev, dtype=dt), spec=spec)
    return _load_checkpoint(spec, dev, dt)


def _load_checkpoint(spec: str, dev: torch.device, dt: torch.dtype) -> LoadedModel:
    path = Path(spec).expanduser()
    known = ", ".join(sorted([*TINY_CONFIGS, *REAL_ALIASES]))
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is neither a built-in alias ({known}) nor a local checkpoint folder"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json: not a transformers checkpoint")
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, local_files_only=True, attn_implementation="sdpa"
        )
    except Exception as exc:  # transformers raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load checkpoint {str(path)!r}: {first}") from exc
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in {"dynamic", "longrope"}:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} uses {rope['rope_type']!r} RoPE, whose frequencies depend on "
            "sequence length; KV re-indexing needs a fixed rotation"
        )
    model = model.to(dev).eval()
    return LoadedModel(model, tokenizer, checkpoint_id(path), spec)


def checkpoint_id(path: Path, sample: int = 4096) -> str:
    """``<folder name>@<hash>`` of the config, the tokenizer and a fingerprint of the weights.

    The id keys shared KV, so it must be equal on every node (no absolute path, no mtime) and differ
    between two fine-tunes of one base. A safetensors file contributes its header (names, dtypes,
    shapes, offsets) and ``sample`` bytes from the start and the middle of *every* tensor, so any
    tensor a fine-tune or a merged adapter changes densely changes the id, while hashing a multi-GB
    checkpoint reads a few MiB; other weight formats are hashed whole. The dtype is left out on
    purpose: a bf16 judge may reuse KV an fp32 agent computed (the runner casts what it adopts).
    """
    digest = hashlib.sha1((path / "config.json").read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    for w in weights:
        digest.update(f"{w.name}:{w.stat().st_size}".encode())
        with w.open("rb") as fh:
            if w.suffix == ".safetensors":
                _hash_safetensors(fh, digest, sample)
            else:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return f"{path.name}@{digest.hexdigest()[:10]}"


def _hash_safetensors(fh, digest, sample: int) -> None:
    """Header plus a start and a middle sample of each tensor's bytes (layout: u64 header size,
    JSON header, data; offsets in the header are relative to the data)."""
    size = int.from_bytes(fh.read(8), "little")
    raw = fh.read(size)
    digest.update(raw)
    try:
        header = json.loads(raw)
    except ValueError:  # not readable as safetensors: let the loader say so; hash what is there
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        return
    base = 8 + size
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items()
                   if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v)
    for begin, end in spans:
        for at in sorted({begin, max(begin, (begin + end) // 2 - sample // 2)}):
            fh.seek(base + at)
            digest.update(fh.read(min(sample, end - at)))
