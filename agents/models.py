"""Model loading: a local checkpoint folder of any RoPE causal LM, or a built-in offline alias.

Built-in aliases (no hub, no download):

* ``tiny-llama``: a small randomly initialised Llama (seed 0, GQA 4 query / 2 KV heads) with a
  byte-level tokenizer built in memory. Checks the KV math; cannot judge anything meaningfully.
* ``tiny-qwen2``: the same idea with the Qwen2 architecture (biased q/k/v, tied embeddings).

Everything else is a path handed to ``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A model spec that names no loadable model; the message is one line for the user."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and a stable id used in cache keys."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@lru_cache(maxsize=1)
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ``<s>``, ``</s>``, ``<pad>``), built offline.

    Every string tokenizes to one token per UTF-8 byte, so segment boundaries never merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(
        arch="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.05,  # large enough that candidate content moves the verdict
        rope_theta=10000.0,
    ),
    "tiny-qwen2": dict(
        arch="qwen2",
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        initializer_range=0.05,  # large enough that candidate content moves the verdict
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Build a random-init tiny model from ``TINY_CONFIGS[name]`` (fixed seed, fp32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = {**TINY_CONFIGS[name], **overrides}
    arch = spec.pop("arch")
    tok = byte_tokenizer()
    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    rope.update(spec.pop("rope_scaling", {}))
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = cfg_cls(**common, **spec, rope_parameters=rope)
    config._attn_implementation = "sdpa"
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def _spec_id(name: str, extra: dict) -> str:
    blob = json.dumps({"name": name, **extra}, sort_keys=True, default=str)
    return f"{name}@{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


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
        return LoadedModel(model, byte_tokenizer(), _spec_id(spec, TINY_CONFIGS[spec]))
    aliases = _real_aliases()
    if spec in aliases:
        return load_model(str(aliases[spec]()), device=dev, dtype=dt)
    return _load_checkpoint(spec, dev, dt)


def _real_aliases() -> dict:
    """Aliases that resolve to a real checkpoint folder (converted once, cached on disk)."""
    from kvjudge.agents import smollm2

    return {"smollm2-135m": smollm2.ensure_folder}


def _load_checkpoint(spec: str, dev: torch.device, dt: torch.dtype) -> LoadedModel:
    path = Path(spec).expanduser()
    known = ", ".join(sorted([*TINY_CONFIGS, *_real_aliases()]))
    if not path.is_dir():
        raise ModelLoadError(
            f"model {spec!r} is neither a built-in alias ({known}) nor a local checkpoint folder"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json: not a transformers checkpoint")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

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
    return LoadedModel(model, tokenizer, checkpoint_id(path))


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
