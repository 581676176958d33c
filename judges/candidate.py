"""What the judge is given per candidate, and where each candidate's KV comes from (torch-free).

Candidate-KV modes (``Judge(candidate_kv=...)``, CLI ``--candidate-kv``):

* ``judge_prefix`` (our mitigation): the answer text encoded after the judge prompt's prefix, so in
  slot 1 it is exact and with one candidate every method equals dense. The agent pays one extra
  prefill per candidate (reusable across every shuffle).
* ``agent`` (KVCOMM; the papers' setting): the answer's KV as the agent computed it, i.e. the
  answer's token ids after the agent's own prompt ids, re-indexed into the judge's slot. The slot
  holds exactly the agent's generated ids (see :mod:`kvjudge.judges.prompt` for the layout), so
  dense and reuse see the same ids. Needs ``token_ids`` (else the text is tokenized) and the agent's
  prompt (``prompt_ids``, or ``agent_prompt`` text turned into ids by
  :func:`kvjudge.models.chat.agent_prompt_ids`).
* ``isolated`` (the 2601.08343 judge code): the answer's ids encoded alone from position 0 (no BOS,
  no prefix), re-indexed into the slot. The prompt is the same as in ``judge_prefix`` mode (so is
  dense); only where the KV comes from differs.

Output modes (``Judge(output=...)``, CLI ``--judge-output``): ``label`` reads the log-probability of
each label token after ``Best candidate: #``; ``generate`` decodes greedily up to ``max_new_tokens``
and parses the chosen number with :func:`kvjudge.judges.parse.parse_choice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvjudge.judges.prompt import EMPTY, JudgeInputError

CANDIDATE_KV_MODES: tuple[str, ...] = ("judge_prefix", "agent", "isolated")
OUTPUT_MODES: tuple[str, ...] = ("label", "generate")
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Candidate:
    """One answer to judge. Plain strings are ``Candidate(text)``.

    ``token_ids``: the ids the agent generated (the answer exactly as written, end-of-turn removed);
    ``prompt_ids``: the ids the agent generated after (its chat prompt); ``agent_prompt``: that prompt
    as text when the ids are not known; ``source``: the agent's name (anchor pools are kept per source).
    """

    text: str
    token_ids: tuple[int, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    source: str | None = None
    agent_prompt: str | None = None

    def __post_init__(self) -> None:
        for name in ("token_ids", "prompt_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(t) for t in value))


_FIELDS = ("text", "token_ids", "prompt_ids", "source", "agent_prompt")


def as_candidates(candidates: Sequence["str | Candidate | dict"]) -> list[Candidate]:
    """``candidates`` as :class:`Candidate` objects: strings are wrapped, dicts (a candidates file's
    JSON, Ray payloads) read by field name; anything else is a one-line error."""
    out = []
    for i, c in enumerate(candidates, start=1):
        if isinstance(c, Candidate):
            out.append(c)
        elif isinstance(c, str):
            out.append(Candidate(c))
        elif isinstance(c, dict):
            unknown = sorted(set(c) - set(_FIELDS))
            if unknown or not isinstance(c.get("text"), str):
                why = f"unknown fields {', '.join(unknown)}" if unknown else "no text"
                raise JudgeInputError(f"candidate {i}: {why} (fields: {', '.join(_FIELDS)})")
            out.append(Candidate(**c))
        else:
            raise JudgeInputError(f"a candidate must be a string or a Candidate, not {type(c).__name__}")
    return out


def answer_ids(tokenizer, text: str) -> tuple[int, ...]:
    """The ids of an answer known only as text (agent mode without ``token_ids``): the stripped text
    (or the empty-answer marker) as plain text, no special tokens."""
    text = text.strip() or EMPTY
    return tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def check_mode(candidate_kv: str, output: str, max_new_tokens: int) -> None:
    """Raise :class:`JudgeInputError` (one line) for an unknown mode or a non-positive token budget."""
    if candidate_kv not in CANDIDATE_KV_MODES:
        raise JudgeInputError(f"unknown candidate-KV mode {candidate_kv!r}; known: {', '.join(CANDIDATE_KV_MODES)}")
    if output not in OUTPUT_MODES:
        raise JudgeInputError(f"unknown judge output {output!r}; known: {', '.join(OUTPUT_MODES)}")
    if int(max_new_tokens) < 1:
        raise JudgeInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
