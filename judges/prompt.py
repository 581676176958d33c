"""The judge prompt, cut into the token pieces that KV reuse caches and re-assembles.

Layout (``#k`` is the 1-based slot number shown to the judge)::

    prefix     = [BOS] system + problem + "Candidate #1:\\n"       (chat template: its header too)
    candidate  = the text of the candidate in slot 1
    glue[k]    = "\\n\\nCandidate #k:\\n"                              for k = 2..N
    candidate  = the text of the candidate in slot k
    suffix     = "\\n\\n" + instruction (+ chat assistant header) + "Best candidate: #"

Candidates are encoded once after ``prefix`` (their exact context when they sit in slot 1) and
the glue pieces once per slot number, so a shuffle of the same candidates encodes nothing new.
The judge's answer is the label token that follows the suffix: ``"1"``, ``"2"``, ... each must be
one token, distinct from the others, when appended to the suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SYSTEM = "You are an impartial judge. Several candidate solutions to one problem follow; pick the best."
INSTRUCTION = "Which candidate solves the problem best? Reply with the number of the best candidate only."
ANSWER_CUE = "Best candidate: #"
EMPTY = "(empty answer)"
_SENTINEL = "\x00KVJUDGE_BODY\x00"


class JudgeInputError(ValueError):
    """Bad judge input (no candidates, too many, empty problem); the message is one line."""


def header(slot: int) -> str:
    return f"Candidate #{slot}:\n"


@dataclass(frozen=True)
class JudgePrompt:
    """Token pieces of one judge prompt with candidates in display order."""

    prefix: tuple[int, ...]
    candidates: tuple[tuple[int, ...], ...]
    glue: tuple[tuple[int, ...], ...]  # glue[i] sits between candidate i and i+1 (0-based)
    suffix: tuple[int, ...]
    labels: tuple[int, ...]
    text: str  # the same prompt as one string (for tokenizer cross-checks)

    @property
    def n(self) -> int:
        return len(self.candidates)

    def pieces(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """``(kind, slot, ids)`` in prompt order, kind in prefix / candidate / glue / suffix (slot 0-based)."""
        out = [("prefix", -1, self.prefix)]
        for i, cand in enumerate(self.candidates):
            if i:
                out.append(("glue", i, self.glue[i - 1]))
            out.append(("candidate", i, cand))
        out.append(("suffix", -1, self.suffix))
        return out

    def ids(self) -> list[int]:
        """The whole prompt's token ids: what dense prefill runs."""
        return [t for _, _, piece in self.pieces() for t in piece]


@dataclass(frozen=True)
class PromptTemplate:
    """The text around the body (chat template or plain) for one tokenizer."""

    pre: str
    post: str
    bos: tuple[int, ...]


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_for(tokenizer) -> PromptTemplate:
    """Wrap the body in the tokenizer's chat template when it has one; else plain text after BOS."""
    if getattr(tokenizer, "chat_template", None):
        for messages in (
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _SENTINEL}],
            [{"role": "user", "content": SYSTEM + "\n\n" + _SENTINEL}],
        ):
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # templates that refuse a system turn
                continue
            pre, post = text.split(_SENTINEL)
            return PromptTemplate(pre, post, ())
    with_special = tokenizer("x")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = (bos,) if bos is not None and with_special and with_special[0] == bos else ()
    return PromptTemplate(SYSTEM + "\n\n", "\n", lead)


@lru_cache(maxsize=64)
def _labels_for(tokenizer, suffix_text: str, n: int) -> tuple[int, ...] | None:
    base = _encode(tokenizer, suffix_text)
    labels = []
    for slot in range(1, n + 1):
        full = _encode(tokenizer, suffix_text + str(slot))
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            return None
        labels.append(full[-1])
    return tuple(labels) if len(set(labels)) == n else None


def max_candidates(tokenizer, suffix_text: str, limit: int = 999) -> int:
    """The largest N for which labels 1..N are single distinct tokens after ``suffix_text``."""
    n = 0
    while n < limit and _labels_for(tokenizer, suffix_text, n + 1) is not None:
        n += 1
    return n


def build_prompt(tokenizer, problem: str, candidates: list[str]) -> JudgePrompt:
    """Tokenize the judge prompt for ``candidates`` (display order) piece by piece."""
    if not problem or not problem.strip():
        raise JudgeInputError("the problem is empty")
    if not candidates:
        raise JudgeInputError("no candidates to judge: give at least one")
    tpl = template_for(tokenizer)
    prefix_text = f"{tpl.pre}Problem:\n{problem.strip()}\n\n{header(1)}"
    suffix_text = f"\n\n{INSTRUCTION}{tpl.post}{ANSWER_CUE}"
    labels = _labels_for(tokenizer, suffix_text, len(candidates))
    if labels is None:
        top = max_candidates(tokenizer, suffix_text)
        raise JudgeInputError(
            f"too many candidates: {len(candidates)} given, but this tokenizer keeps labels "
            f"1..N single distinct tokens only up to N={top}"
        )
    texts = [c.strip() or EMPTY for c in candidates]
    glue_texts = [f"\n\n{header(k)}" for k in range(2, len(texts) + 1)]
    full = prefix_text + texts[0] + "".join(g + t for g, t in zip(glue_texts, texts[1:])) + suffix_text
    return JudgePrompt(
        prefix=tpl.bos + _encode(tokenizer, prefix_text),
        candidates=tuple(_encode(tokenizer, t) for t in texts),
        glue=tuple(_encode(tokenizer, g) for g in glue_texts),
        suffix=_encode(tokenizer, suffix_text),
        labels=labels,
        text=full,
    )
