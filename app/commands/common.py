"""What every command shares: the one-line :class:`UserError`, the argparse :class:`Parser` that
reports a bad flag in one line, SIGTERM taken as Ctrl-C, the checks of common flags, and the flags
several commands add. Standard library and torch-free tables only (torch is imported inside
:func:`checked_device` and :func:`model_on`, which handlers call)."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.judges.candidate import CANDIDATE_KV_MODES, DEFAULT_MAX_NEW_TOKENS, OUTPUT_MODES
from kvjudge.judges.debias import DEBIAS_MODES

MAX_TEXT_BYTES = 1 << 20  # what ``@path`` may read


class UserError(ValueError):
    """An error caused by the user's input; printed as one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is (what was written stays, actors are shut down), exit 143."""


def on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def stop_code(exc: KeyboardInterrupt) -> tuple[int, str]:
    """Exit code and word for an interrupt: 143 ``terminated`` (SIGTERM), 130 ``interrupted`` (Ctrl-C)."""
    return (143, "terminated") if isinstance(exc, Terminated) else (130, "interrupted")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_text(value: str) -> str:
    """``@path`` reads the text from a regular file of at most 1 MiB; anything else is the text itself."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        if not path.is_file():
            raise UserError(f"cannot read {str(path)!r}: not a regular file")
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise UserError(f"cannot read {str(path)!r}: larger than {MAX_TEXT_BYTES >> 20} MiB")
        with path.open("rb") as fh:
            data = fh.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise UserError(f"cannot read {str(path)!r}: larger than {MAX_TEXT_BYTES >> 20} MiB")
        return data.decode("utf-8")  # strict: a bad byte is refused, never replaced
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {str(path)!r}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte "
                        f"offset {exc.start})") from None


def checked_text(flag: str, value: str) -> str:
    """``value`` when it is valid Unicode text; a one-line error naming ``flag`` when it holds a lone
    surrogate (what Python makes of undecodable command-line bytes, or a JSON ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{flag}: not valid text (a lone surrogate or undecodable byte at character {exc.start})") \
            from None
    return value


def judge_max_tokens(value: int | None, default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """``--judge-max-tokens`` in 1..4096 (the topology schema's bound); ``default`` when not given."""
    from kvjudge.topologies.schema import MAX_JUDGE_TOKENS

    if value is None:
        return default
    if not 1 <= value <= MAX_JUDGE_TOKENS:
        raise UserError(f"--judge-max-tokens must be in 1..{MAX_JUDGE_TOKENS}, got {value}")
    return value


def checked_device(value: str | None) -> str | None:
    """``--device`` checked against what this torch has (imports torch: call it in a handler)."""
    if value is None:
        return None
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"--device {value}: this machine has no CUDA device (torch sees none); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {value}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {value}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {value}: only cpu, cuda and mps devices are supported")
    return value


def default_out(name: str, prefix: str = "") -> Path:
    """``runs/<prefix><name>`` inside the working directory, the name reduced to safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    return Path("runs") / f"{prefix}{safe[:100]}"


def positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--{flag} must be >= 1, got {value}")


def nonnegative(flag: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise UserError(f"--{flag} must be >= 0, got {value}")


def name_list(flag: str, value: str, known: tuple[str, ...], kind: str) -> list[str]:
    """A comma-separated ``--flag`` list of names, each one of ``known`` (else a one-line error)."""
    found = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in found if m not in known]
    if bad:
        raise UserError(f"--{flag}: unknown {kind} {bad[0]!r}; known: {', '.join(known)}")
    return found


def float_list(flag: str, value: str) -> list[float]:
    """A comma-separated ``--flag`` list of distinct numbers, at least one (else a one-line error)."""
    try:
        numbers = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{flag}: {value!r} is not a comma-separated list of numbers") from None
    if not numbers:
        raise UserError(f"--{flag}: give at least one number")
    twice = next((x for i, x in enumerate(numbers) if x in numbers[:i]), None)
    if twice is not None:
        raise UserError(f"--{flag}: {twice:g} is given twice")
    return numbers


def replicas_arg(value: str | None) -> int | str | None:
    """``--replicas`` N in 1..256 (the topology schema's bound) or ``auto``; what the cluster can hold is
    checked when the run starts (:meth:`~kvjudge.runtime.runner.Orchestrator.start`)."""
    from kvjudge.topologies.schema import MAX_REPLICAS

    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--replicas must be a number or auto, got {value!r}") from None
    if not 1 <= n <= MAX_REPLICAS:
        raise UserError(f"--replicas must be in 1..{MAX_REPLICAS} or auto, got {n}")
    return n


def parse_compress(value: str | None) -> dict | None:
    """``METHOD:RATIO`` (kept fraction of tokens in (0, 1]) -> ``{"method", "ratio"}``; ``none`` -> None."""
    if value is None or value == "none":
        return None
    method, _, ratio = value.partition(":")
    if method not in COMPRESSION_METHODS:
        raise UserError(f"--compress: unknown method {method!r}; known: {', '.join(COMPRESSION_METHODS)}")
    try:
        kept = float(ratio)
    except ValueError:
        raise UserError(f"--compress {value!r}: write METHOD:RATIO with RATIO the kept fraction, e.g. laprox:0.25") \
            from None
    if not 0.0 < kept <= 1.0:
        raise UserError(f"--compress: the kept ratio must be in (0, 1], got {ratio}")
    return {"method": method, "ratio": kept}


def model_on(model: str, device: str | None):
    """``model`` as a name (loaded where the command likes), or loaded on the checked ``--device``."""
    if device is None:
        return model
    from kvjudge.models import load_model

    return load_model(model, device=checked_device(device))


def method_options_of(args: argparse.Namespace, judged: Sequence[str] | None = None,
                      where: str = "") -> dict[str, dict]:
    """``{method: {key: value}}`` from ``--method-option`` (and ``--gate``); one-line errors for unknown ones
    and, given the ``judged`` methods (named by the flag ``where``), for options no judged method reads."""
    from kvjudge.judges.catalog import parse_method_options

    options = parse_method_options(getattr(args, "method_option", None) or [])
    for name in options if judged is not None else ():
        if name not in judged:
            raise UserError(f"--method-option {name}.*: {name} is not judged here ({where}), so it would be ignored")
    gate = getattr(args, "gate", None)
    if gate is not None:
        if not Path(gate).expanduser().is_file():
            raise UserError(f"--gate: file not found: {gate}")
        if judged is not None and "selective" not in judged:
            raise UserError(f"--gate is the selective method's gate file; selective is not judged here ({where})")
        options.setdefault("selective", {})["gate"] = str(Path(gate).expanduser())
    if options:
        from kvjudge.judges.methods import make_method

        for name, opts in options.items():
            make_method(name, **opts)  # bad values or gate files: one line, before any model loads
    return options


def add_model(p: argparse.ArgumentParser, default: str = "tiny-llama") -> None:
    p.add_argument("--model", default=os.environ.get("KVJUDGE_MODEL", default),
                   help=f"built-in alias (tiny-llama, tiny-qwen2, smollm2-135m) or a local checkpoint folder "
                        f"(default {default})")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_sampling(p: argparse.ArgumentParser, what: str = "problems") -> None:
    """``--offset`` and ``--sample-seed``: which problems a ``--limit`` takes (``datasets.sample_problems``)."""
    p.add_argument("--offset", type=int, default=0,
                   help=f"skip the first K {what} of the sampling order (disjoint calibration/test splits)")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="MMLU: seed of the sample stratified over its 57 subjects (default 0); GSM8K, HumanEval, "
                        "files: shuffle with this seed (default: their own order)")


def add_judge_modes(p: argparse.ArgumentParser, default_kv: str | None) -> None:
    p.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default=default_kv,
                   help="where candidate KV comes from: agent (as the agent computed it while writing), isolated "
                        "(encoded alone from position 0) or judge_prefix (encoded after the judge's prefix)"
                        + (f" (default {default_kv})" if default_kv else " (default: the topology's)"))
    p.add_argument("--judge-output", choices=OUTPUT_MODES, default=None,
                   help="label: read the label's log-probability; generate: decode an answer and parse the number")
    p.add_argument("--judge-max-tokens", type=int, default=None,
                   help=f"tokens a generated judge answer may take ({DEFAULT_MAX_NEW_TOKENS})")
    add_debias(p, permutations=True)


def add_debias(p: argparse.ArgumentParser, permutations: bool = False) -> None:
    """``--judge-debias`` (and ``--judge-permutations``): position-debiased judging (kvjudge.judges.debias)."""
    p.add_argument("--judge-debias", choices=DEBIAS_MODES, default=None,
                   help="none; pride or content_free: label scores minus each method's slot prior saved by "
                        "kvjudge calibrate (generate output: pride is the vote over every rotation)")
    if permutations:
        p.add_argument("--judge-permutations", type=int, default=None,
                       help="K > 1: judge K cyclic rotations of the candidates, the highest summed score wins (1)")


def judge_permutations(args: argparse.Namespace) -> int:
    """``--judge-permutations`` (default 1); below 1 is a one-line error."""
    positive("judge-permutations", args.judge_permutations)
    return args.judge_permutations or 1


def add_method_options(p: argparse.ArgumentParser, gate: bool = False) -> None:
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option of a judge method (repeat), e.g. selective.gate=gate.json; unknown keys are errors")
    if gate:
        p.add_argument("--gate", default=None, metavar="FILE",
                       help="the selective method's gate file (kvjudge calibrate-gate), = --method-option selective.gate=FILE")
