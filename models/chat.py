"""An agent's prompt as token ids: one user turn in the tokenizer's chat template (ground floor).

Both sides of KV reuse need the same ids: the agent generates after them, and the judge (in
``agent`` candidate-KV mode) looks the answer's KV up under ``segment_key(model_id, prompt_ids,
answer_ids)`` or rebuilds it by one prefill of ``prompt_ids + answer_ids``. Keeping the function
here (below ``agents/`` and ``judges/``) lets both import it.
"""

from __future__ import annotations

FIXED_DATE = "01 Jan 2025"  # templates that print today's date would change the ids at midnight
_SENTINEL = "\x00KVJUDGE_TURN\x00"


def _ids(tokenizer, text: str, untrusted: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=untrusted)["input_ids"])


def _has_special_text(tokenizer, text: str) -> bool:
    """Whether ``text`` contains the string of a special / added token (e.g. ``<|im_end|>``)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {str(t) for t in (getattr(tokenizer, "get_added_vocab", dict)() or {})}
    return any(s and s in text for s in specials)


def _render(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True, date_string=FIXED_DATE
    )


def agent_prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    """Token ids of ``prompt_text`` as one user turn with the generation prompt (the assistant header).

    * With a chat template: the template rendered with the text (and a fixed date), tokenized like
      ``apply_chat_template(..., tokenize=True)`` does. When the text contains special-token
      strings, the template's own text is tokenized apart and the user text as plain text, so a
      prompt cannot inject control tokens.
    * Without one: ``[BOS]`` (when the tokenizer adds it to plain text) + the text as plain text.
    """
    if getattr(tokenizer, "chat_template", None):
        if not _has_special_text(tokenizer, prompt_text):
            return _ids(tokenizer, _render(tokenizer, prompt_text))
        pre, post = _render(tokenizer, _SENTINEL).split(_SENTINEL)
        return _ids(tokenizer, pre) + _ids(tokenizer, prompt_text, untrusted=True) + _ids(tokenizer, post)
    with_special = tokenizer("x")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [bos] if bos is not None and with_special and with_special[0] == bos else []
    return lead + _ids(tokenizer, prompt_text, untrusted=True)
