"""Checkpoint ids: equal for equal checkpoints wherever they live, different for other weights."""

import torch

from kvjudge.models import checkpoint_id, tiny_model


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def test_checkpoint_id_follows_the_weights_not_the_path(tmp_path):
    model = tiny_model("tiny-llama")
    a = _save(model, tmp_path / "a" / "ckpt")
    b = _save(model, tmp_path / "b" / "ckpt")
    assert checkpoint_id(a) == checkpoint_id(b)
    assert checkpoint_id(a).startswith("ckpt@")
    # "fine-tunes": same config, one tensor changed densely (a merged adapter), in the middle of the file
    names = [n for n, _ in model.named_parameters()]
    for name in (names[len(names) // 2], names[-1]):
        tuned = tiny_model("tiny-llama")
        with torch.no_grad():
            tuned.get_parameter(name).add_(0.5)
        c = _save(tuned, tmp_path / name / "ckpt")
        assert (c / "config.json").read_bytes() == (a / "config.json").read_bytes()
        assert checkpoint_id(c) != checkpoint_id(a), name


def test_checkpoint_id_of_other_weight_formats(tmp_path):
    model = tiny_model("tiny-llama")
    a = tmp_path / "a" / "ckpt"
    model.save_pretrained(a)
    for f in a.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), a / "pytorch_model.bin")
    first = checkpoint_id(a)
    data = bytearray((a / "pytorch_model.bin").read_bytes())
    data[len(data) // 3] ^= 1  # one byte anywhere: whole-file hash
    (a / "pytorch_model.bin").write_bytes(bytes(data))
    assert checkpoint_id(a) != first
