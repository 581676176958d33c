"""What every model loader returns: a causal LM with its tokenizer and a stable id, and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: ModelLoadError (raised by the simulated model) needs no torch
    import torch


class ModelLoadError(ValueError):
    """A model spec that names no loadable model; the message is one line for the user."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and a stable id used in cache keys."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    spec: str = ""  # what it was loaded as (alias or folder): the --model a printed command should name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
