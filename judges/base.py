"""What every judge shares: the case to judge, what a method returns, the verdict, and the interface
of a judge (:class:`JudgeLike`).

A method is a dataclass (its config and state) in :mod:`kvjudge.judges.methods` whose
``__call__(engine, case)`` returns an :class:`Outcome` (the method type, ``JudgeMethod``, lives beside
that registry); :class:`kvjudge.judges.judge.Judge` times it and turns it into a :class:`Verdict`.
:class:`JudgeLike` is what the judge actor calls, met by the real ``Judge`` and the simulated
:class:`kvjudge.judges.sim.SimJudge` (a test checks both). Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, Candidate
from kvjudge.judges.prompt import JudgePrompt

if TYPE_CHECKING:  # typing only: this module stays importable without torch
    import torch

Gate = Literal["accepted", "fallback"]


@dataclass
class JudgeCase:
    """One judge call: the prompt (candidates in display order) and each candidate's source agent.

    ``contexts[i]``: the token ids slot ``i``'s candidate KV is encoded after (``None``: the prompt's
    prefix, i.e. ``judge_prefix`` mode; the agent's prompt ids in ``agent`` mode; ``()`` in
    ``isolated`` mode). ``exact_first``: slot 1's KV was encoded in its real context (only in
    ``judge_prefix`` mode), so its tokens need no correction. ``output``: ``"label"`` or
    ``"generate"`` (then up to ``max_new_tokens`` are decoded greedily on the assembled cache).
    """

    prompt: JudgePrompt
    sources: tuple[str, ...]
    memo: dict = field(default_factory=dict)  # results shared by methods within one call (dense)
    contexts: tuple[tuple[int, ...], ...] | None = None
    exact_first: bool = True
    candidate_kv: str = "judge_prefix"
    output: str = "label"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    # position debiasing (:mod:`kvjudge.judges.debias`): "none" | "pride" | "content_free", and
    # method name -> log prior over the N display slots; label scores become log p - log prior
    debias: str = "none"
    priors: dict[str, tuple[float, ...]] | None = None

    def context(self, slot: int) -> tuple[int, ...]:
        """The ids slot ``slot``'s (0-based) candidate KV is encoded after."""
        return tuple(self.prompt.prefix) if self.contexts is None else tuple(self.contexts[slot])


@dataclass
class Outcome:
    """What a method computed, and how.

    ``label`` output: ``scores`` are the per-candidate label log-probs ``[N]``. ``generate`` output:
    ``text`` is the judge's decoded answer, ``choice`` the 1-based number parsed from it (``None``
    when unparseable, ``parse_rule`` says why) and ``scores`` is empty ``[0]``. Re-wrap an outcome
    with ``dataclasses.replace`` so these fields travel with it.

    ``gate`` is set by gating methods only: ``"accepted"`` when the reuse answer was kept,
    ``"fallback"`` when dense decided. ``decision`` holds method-specific details.
    """

    scores: "torch.Tensor"
    reused: bool
    decision: dict | None = None
    gate: Gate | None = None
    text: str | None = None
    choice: int | None = None
    parse_rule: str | None = None

    @property
    def winner(self) -> int | None:
        """The 1-based slot picked: the parsed ``choice`` in generate mode, else the argmax label
        (``None`` when there is nothing to pick from). Methods compare winners through this."""
        if self.text is not None:
            return self.choice
        return int(self.scores.argmax()) + 1 if self.scores.numel() else None


@dataclass
class Verdict:
    """A judge decision. ``winner`` is 1-based, as shown to the judge (``None``: a generated answer
    that names no candidate, see :mod:`kvjudge.judges.parse`). ``scores[i]`` is the log-probability
    (full vocabulary) of slot ``i+1``'s label at the answer position in ``label`` output, ``[]`` in
    ``generate`` output, where ``answer_text`` is the decoded answer and ``parse_rule`` the rule that
    read it. ``decoded_tokens``: tokens generated after the prompt (not part of ``prefilled_tokens``)."""

    method: str
    winner: int | None
    scores: list[float]
    reused: bool
    latency_ms: float
    prefilled_tokens: int
    encoded_tokens: int
    decision: dict | None = None
    gate: Gate | None = None
    candidate_kv: str = "judge_prefix"
    output: str = "label"
    answer_text: str | None = None
    parse_rule: str | None = None
    decoded_tokens: int = 0
    # "none" | "pride" | "content_free": whether ``scores`` are debiased label log-probs (log p - log prior)
    debias: str = "none"
    # permutation consensus (K > 1 rotations judged): permutations, per-rotation winners (in this
    # verdict's display order), consistent (one candidate under every rotation), agreement, cost_x_dense
    consensus: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


CandidateLike = str | Candidate | dict  # a text, a Candidate, or a Candidate as a dict (files, Ray)
Fetch = Callable[[str], Any]  # a store lookup: key -> segment, or None (a miss)


@runtime_checkable
class JudgeLike(Protocol):
    """What the judge actor (and a pipeline) calls on a judge, real or simulated.

    Both take ``fetch`` (a :data:`Fetch`, e.g. the shared store's lookup) as a constructor argument:
    candidate segments are looked up there before being encoded; ``fetched`` counts the hits so far.
    ``device`` says where the judge computes (``"cpu"``, ``"cuda:0"``; ``"sim"`` for the simulation).
    ``check_candidates`` says why ``n`` candidates cannot be judged (``None``: they can).
    ``candidate_kv_request`` returns ``{"context_ids", "ids", "key", "mode"}``: the KV of ``answer``
    this judge looks up in candidate-KV ``mode``.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def fetched(self) -> int: ...

    def check_candidates(self, problem: str, n: int) -> str | None: ...

    def candidate_kv_request(self, problem: str, answer: CandidateLike, mode: str | None = None) -> dict: ...

    def prefetch(self, problem: str, candidates: Sequence[CandidateLike], candidate_kv: str | None = None) -> None: ...

    def judge(self, problem: str, candidates: Sequence[CandidateLike], method: str | None = None,
              sources: Sequence[str] | None = None, candidate_kv: str | None = None, output: str | None = None,
              max_new_tokens: int | None = None) -> Verdict: ...
