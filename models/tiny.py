"""Tiny random-weight models with a byte-level tokenizer built in memory (tests and smoke runs).

* ``tiny-llama``: a small randomly initialised Llama (seed 0, GQA 4 query / 2 KV heads).
  Checks the KV math; cannot judge anything meaningfully.
* ``tiny-qwen2``: the same idea with the Qwen2 architecture (biased q/k/v, tied embeddings).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


@lru_cache(maxsize=1)
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ``<s>``, ``</s>``, ``<pad>``), built offline.

    Every string tokenizes to one token per UTF-8 byte, so segment boundaries never merge.
    """
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


def spec_id(name: str, extra: dict) -> str:
    blob = json.dumps({"name": name, **extra}, sort_keys=True, default=str)
    return f"{name}@{hashlib.sha1(blob.encode()).hexdigest()[:10]}"
