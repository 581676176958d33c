"""The judge prompt, cut into the token pieces that KV reuse caches and re-assembles.

Layout (``#k`` is the 1-based slot number shown to the judge)::

    prefix     = [BOS] system + problem + "Candidate #1:\\n"       (chat template: its header too)
    candidate  = the text of the candidate in slot 1
    glue[k]    = "\\n\\n" + "Candidate #k:\\n"                         for k = 2..N
    candidate  = the text of the candidate in slot k
    suffix     = "\\n\\n" + instruction (+ chat assistant header) + "Best candidate: #"

Every layout yields the same token ids as the whole text tokenized at once; which layout does so
depends on the tokenizer and is found once per tokenizer on probe texts (:func:`layout_for`):

* the blank line between candidates either starts the next piece (as drawn; GPT-2 style
  pre-tokenizers) or ends each candidate piece (Llama-3 / Qwen2 style ones join punctuation with the
  newlines after it);
* SentencePiece-style tokenizers (Llama-2, Mistral) prepend a word-boundary ``"▁"`` to every text
  they are given, so a piece tokenized alone starts with a token the whole text does not have there.
  For them each piece but the first is tokenized *after a fixed newline* and the newline's tokens are
  dropped (``ids("\n" + piece)[len(ids("\n")):]``), which is how it tokenizes inside the prompt.

Problem and candidate texts are untrusted: special-token strings inside them are tokenized as plain
text, never as control tokens.

Candidates are encoded once after ``prefix`` (their exact context when they sit in slot 1) and
the glue pieces once per slot number, so a shuffle of the same candidates encodes nothing new.
The judge's answer is the label token that follows the suffix: ``"1"``, ``"2"``, ... each must be
one token, distinct from the others, when appended to the suffix.

Given token ids (``candidate_ids``: the ``agent`` candidate-KV mode, where a slot holds exactly the
ids the agent generated, whatever whitespace they start or end with), each candidate piece *is*
those ids and the blank lines always go to the following piece (``glue = "\n\n" + header``,
``suffix = "\n\n" + ...``, tokenized like any later piece), whatever the tokenizer's layout.
``ids()`` is then the concatenation of the pieces, which dense and reuse share, and no longer the
tokenization of ``text`` (token merges across a candidate's edges are not re-done).

With ``output="generate"`` the suffix asks for the number first, in the form ``Best candidate: #k``
(then free text), and does not end with the answer cue; there are no labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

SYSTEM = "You are an impartial judge. Several candidate solutions to one problem follow; pick the best."
INSTRUCTION = "Which candidate solves the problem best? Reply with the number of the best candidate only."
ANSWER_CUE = "Best candidate: #"
GENERATE_INSTRUCTION = (
    "Which candidate solves the problem best? Reply with the number of the best candidate (1 to {n}) on the "
    'first line, as "Best candidate: #<number>"; you may then explain your choice.'
)
EMPTY = "(empty answer)"
_SENTINEL = "\x00KVJUDGE_BODY\x00"
FIXED_DATE = "01 Jan 2025"
SEP = "\n\n"


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
    labels: tuple[int, ...]  # label token of slot 1..N after the suffix; () with output="generate"
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


def _encode(tokenizer, text: str, untrusted: bool = False) -> tuple[int, ...]:
    """Token ids of ``text``; ``untrusted`` text never yields special (control) tokens."""
    return tuple(tokenizer(text, add_special_tokens=False, split_special_tokens=untrusted)["input_ids"])


_ANCHOR = "\n"


@lru_cache(maxsize=16)
def _anchor_ids(tokenizer) -> tuple[int, ...]:
    return _encode(tokenizer, _ANCHOR)


def _encode_inside(tokenizer, text: str, untrusted: bool = False) -> tuple[int, ...]:
    """Token ids of ``text`` as it tokenizes after a newline inside a longer text (no word-boundary
    marker of its own); the plain ids when the newline's tokens are not a prefix of the result."""
    anchor = _anchor_ids(tokenizer)
    ids = _encode(tokenizer, _ANCHOR + text, untrusted)
    return ids[len(anchor):] if ids[: len(anchor)] == anchor else _encode(tokenizer, text, untrusted)


@dataclass(frozen=True)
class Layout:
    """How a tokenizer's judge prompt is cut: where the blank line goes and how pieces are encoded."""

    lead: bool  # the blank line between candidates starts the next piece (else ends the candidate)
    inside: bool  # pieces after the first are tokenized as inside a text (SentencePiece "▁" prefix)

    def encode(self, tokenizer, text: str, untrusted: bool = False) -> tuple[int, ...]:
        return (_encode_inside if self.inside else _encode)(tokenizer, text, untrusted)


def clean_candidate(text: str) -> str:
    """The text without surrounding whitespace: leading spaces would merge with the newline before
    the candidate in BPE pre-tokenizers and break the piece boundary."""
    return text.strip() or EMPTY


def template_for(tokenizer) -> PromptTemplate:
    """Wrap the body in the tokenizer's chat template when it has one; else plain text after BOS."""
    if getattr(tokenizer, "chat_template", None):
        for messages in (
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _SENTINEL}],
            [{"role": "user", "content": SYSTEM + "\n\n" + _SENTINEL}],
        ):
            try:
                # a fixed date: templates that print today's date would change every key at midnight
                text = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, date_string=FIXED_DATE
                )
                pre, post = text.split(_SENTINEL)
            except Exception:  # templates that refuse a system turn, or escape the sentinel
                continue
            starts_with_bos = bool(tokenizer.bos_token) and pre.startswith(tokenizer.bos_token)
            return PromptTemplate(pre, post, () if starts_with_bos else _default_bos(tokenizer))
    return PromptTemplate(SYSTEM + "\n\n", "\n", _default_bos(tokenizer))


def _default_bos(tokenizer) -> tuple[int, ...]:
    """``(bos,)`` when the tokenizer adds BOS to plain text by itself, else ``()``."""
    with_special = tokenizer("x")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return (bos,) if bos is not None and with_special and with_special[0] == bos else ()


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


def build_prompt(
    tokenizer,
    problem: str,
    candidates: list[str],
    candidate_ids: Sequence[Sequence[int]] | None = None,
    output: str = "label",
) -> JudgePrompt:
    """Tokenize the judge prompt for ``candidates`` (display order) piece by piece.

    ``candidate_ids``: one id sequence per candidate, used as that slot's piece verbatim (``agent``
    mode; ``candidates`` then only give the display text). ``output``: ``"label"`` or ``"generate"``.
    """
    if not problem or not problem.strip():
        raise JudgeInputError("the problem is empty")
    if not candidates:
        raise JudgeInputError("no candidates to judge: give at least one")
    if candidate_ids is not None:
        if len(candidate_ids) != len(candidates):
            raise JudgeInputError(f"{len(candidate_ids)} token-id lists for {len(candidates)} candidates")
        if any(len(ids) == 0 for ids in candidate_ids):
            raise JudgeInputError("a candidate's token ids are empty")
        candidate_ids = [tuple(int(t) for t in ids) for ids in candidate_ids]
    if output not in ("label", "generate"):
        raise JudgeInputError(f"unknown judge output {output!r}; known: label, generate")
    return _assemble(tokenizer, problem, list(candidates), layout_for(tokenizer), candidate_ids, output)


def _assemble(
    tokenizer,
    problem: str,
    candidates: list[str],
    layout: Layout,
    candidate_ids: list[tuple[int, ...]] | None = None,
    output: str = "label",
) -> JudgePrompt:
    tpl = template_for(tokenizer)
    # given ids are pieces of their own: the blank line then always starts the next piece
    lead = layout.lead or candidate_ids is not None
    sep_before, sep_after = (SEP, "") if lead else ("", SEP)
    enc = layout.encode
    body = f"Problem:\n{problem.strip()}\n\n{header(1)}"
    if output == "generate":
        suffix_text = f"{sep_before}{GENERATE_INSTRUCTION.format(n=len(candidates))}{tpl.post}"
        labels: tuple[int, ...] | None = ()
    else:
        suffix_text = f"{sep_before}{INSTRUCTION}{tpl.post}{ANSWER_CUE}"
        labels = _labels_for(tokenizer, suffix_text, len(candidates))
    if labels is None:
        top = max_candidates(tokenizer, suffix_text)
        raise JudgeInputError(
            f"too many candidates: {len(candidates)} given, but this tokenizer keeps labels "
            f"1..N single distinct tokens only up to N={top}"
        )
    texts = [clean_candidate(c) + sep_after for c in candidates]
    glue_texts = [sep_before + header(k) for k in range(2, len(texts) + 1)]
    full = tpl.pre + body + texts[0] + "".join(g + t for g, t in zip(glue_texts, texts[1:])) + suffix_text
    # the template's own text starts the prompt; every later piece is encoded as inside the text
    pre = _encode(tokenizer, tpl.pre)
    if candidate_ids is None:
        pieces = tuple(enc(tokenizer, t, untrusted=True) for t in texts)
    else:
        pieces = tuple(candidate_ids)
    return JudgePrompt(
        prefix=tpl.bos + pre + (enc if pre else _encode)(tokenizer, body, untrusted=True),
        candidates=pieces,
        glue=tuple(enc(tokenizer, g) for g in glue_texts),
        suffix=enc(tokenizer, suffix_text),
        labels=labels,
        text=full,
    )


_PROBES = ["def f(x):\n    return x + 1", "The answer is 42.", "```python\nprint(f(1))\n```", "x = [1, 2]\ny = x"]


@lru_cache(maxsize=16)
def layout_for(tokenizer) -> Layout:
    """The first layout whose pieces tokenize exactly like the whole text on probe candidates
    (plain layouts first, so ids of tokenizers that need no help never change). Decided once per
    tokenizer, so keys stay stable; when none matches, dense and reuse still share the piece ids
    (consistent, but the pieces then differ slightly from the text's own tokenization)."""
    layouts = [Layout(lead, inside) for inside in (False, True) for lead in (True, False)]
    for layout in layouts:
        probe = _assemble(tokenizer, "Probe problem?", _PROBES, layout)
        whole = list(template_for(tokenizer).bos) + list(_encode(tokenizer, probe.text))
        if probe.ids() == whole:
            return layout
    return layouts[0]
