"""Checkpoint ids: equal for equal checkpoints wherever they live, different for other weights."""

import torch

from kvjudge.agents.models import checkpoint_id, tiny_model


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def test_checkpoint_id_follows_the_weights_not_the_path(tmp_path):
    model = tiny_model("tiny-llama")
    a = _save(model, tmp_path / "a" / "ckpt")
    b = _save(model, tmp_path / "b" / "ckpt")
    assert checkpoint_id(a) == checkpoint_id(b)
    assert checkpoint_id(a).startswith("ckpt@")
    with torch.no_grad():  # a "fine-tune": same config, one weight changed
        model.lm_head.weight[0, 0] += 1.0
    c = _save(model, tmp_path / "c" / "ckpt")
    assert (c / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert checkpoint_id(c) != checkpoint_id(a)
