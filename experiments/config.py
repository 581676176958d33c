"""What one ``kvjudge eval`` run is: the dataset, the methods, the shuffle seeds, where results go."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, check_mode
from kvjudge.judges.catalog import DEFAULT_METHODS, METHOD_ORDER
from kvjudge.judges.debias import check_debias
from kvjudge.topologies.schema import MAX_SEED, MAX_TEMPERATURE

ARMS = ("naive", "kvcomm", "pal_kv")  # the random gate's possible reuse arms

DEFAULT_SEEDS: tuple[int, ...] = (42, 123, 456)
PAPER_RANDOM_COVERAGE = 0.83


@dataclass
class EvalConfig:
    """Everything one ``kvjudge eval`` run needs (paths may be str or Path)."""

    dataset: str
    out: Path
    topology: str = "progressive_refinement"
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    limit: int | None = None
    candidates: Path | None = None
    data: str | None = None
    resume: bool = False
    device: str | None = None
    candidate_kv: str = "agent"  # the papers' setting: the KV each agent computed while writing
    judge_output: str = "label"
    judge_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    gate_arm: str = "naive"  # the random gate's reuse arm
    unsafe_exec: bool = False  # grade untrusted code even without sandbox isolation
    compress: dict | None = None  # {"method", "ratio"}: candidate KV token-compressed as a store would
    method_options: dict | None = None  # {method: {key: value}}: --method-option METHOD.KEY=VALUE
    offset: int = 0  # skip the first K problems of the sampling order (disjoint calibration / test splits)
    sample_seed: int | None = None  # MMLU: the stratified sample's seed (0 when None); others: shuffle when set
    temperature: float | None = None  # every agent samples at this temperature (None: the topology's own)
    generation_seed: int = 0  # with a temperature: agent i samples with seed generation_seed + 1000 * i
    judge_debias: str = "none"  # none | pride | content_free (kvjudge.judges.debias)
    judge_permutations: int = 1  # K > 1: permutation consensus over K cyclic rotations
    calibrate_on: int = 0  # estimate the debias priors on the first K problems, judge (and score) only the rest
    rescore_from: Path | None = None  # an eval folder whose dense/naive/partial calls are re-scored, not re-judged

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.candidates = Path(self.candidates) if self.candidates else None
        self.methods = tuple(parse_methods(self.methods))
        self.seeds = tuple(parse_seeds(self.seeds))
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.offset < 0:
            raise ValueError(f"--offset must be >= 0, got {self.offset}")
        if self.temperature is not None:
            if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
                raise ValueError(f"--temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
            if self.candidates is not None:
                raise ValueError("--temperature applies to candidate generation, which --candidates skips")
        if not 0 <= self.generation_seed <= MAX_SEED // 2:
            raise ValueError(f"--generation-seed must be in [0, {MAX_SEED // 2}], got {self.generation_seed}")
        check_mode(self.candidate_kv, self.judge_output, self.judge_max_tokens)
        check_debias(self.judge_debias, self.judge_output, self.judge_permutations)
        if self.calibrate_on < 0 or (self.calibrate_on and self.judge_debias == "none"):
            raise ValueError(f"--calibrate-on {self.calibrate_on}: give K >= 1 together with --judge-debias pride "
                             "or content_free")
        if self.gate_arm not in ARMS:
            raise ValueError(f"--gate-arm must be one of {', '.join(ARMS)}, not {self.gate_arm!r}")


def parse_methods(spec: str | Iterable[str]) -> list[str]:
    """``"naive,dg_jkr"`` (or a list) -> known method names, dense first, duplicates dropped."""
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if str(m).strip()]
    if not names:
        raise ValueError("--methods is empty: name at least one judge method")
    known = list(METHOD_ORDER)
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"unknown judge method {bad[0]!r} in --methods; known methods: {', '.join(known)}")
    out = ["dense"]
    for m in names:
        if m not in out:
            out.append(m)
    return out


def parse_seeds(spec: str | Iterable[int]) -> list[int]:
    """``"42,123,456"`` (or a list) -> distinct integer seeds, in order."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    seeds: list[int] = []
    for p in parts:
        text = str(p).strip()
        if not text:
            continue
        try:
            s = int(text)
        except ValueError:
            raise ValueError(f"--seeds: {text!r} is not an integer (expected e.g. 42,123,456)") from None
        if s in seeds:
            raise ValueError(f"--seeds: seed {s} given twice")
        seeds.append(s)
    if not seeds:
        raise ValueError("--seeds is empty: give at least one integer seed, e.g. 42,123,456")
    return seeds
