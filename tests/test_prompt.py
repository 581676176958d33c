"""Judge prompt pieces == the whole text's tokenization, on tokenizers with different word-boundary rules."""

import string

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvjudge.judges.prompt import build_prompt, layout_for, template_for

CORPUS = [
    "You are an impartial judge. Several candidate solutions to one problem follow; pick the best.",
    "Problem: add two numbers. Candidate answer: return the sum. def f(x): print the value, it is 42",
    "Which candidate solves the problem best? Reply with the number of the best candidate only.",
]
CASES = [
    ("Add 2 and 3?", ["return 5", "The answer is 42.", "def f(x):\n    return x + 1", "  padded  "]),
    ("Sort a list.\nKeep it stable.", ["```python\nsorted(xs)\n```", "xs.sort()", "a < b and c > d"]),
]


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2 / Mistral-style tokenizer built offline: spaces become "▁", every text given to it
    gets a leading "▁" (the dummy prefix), newlines are tokens of their own."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable) + ["▁"], show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _whole(tokenizer, prompt):
    return list(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])


def test_sentencepiece_style_pieces_match_the_whole_text():
    tok = sentencepiece_like()
    alone = tok.convert_ids_to_tokens(tok("x", add_special_tokens=False)["input_ids"])
    assert alone[0].startswith("▁")  # the dummy prefix that breaks naive piece-by-piece tokenization
    assert layout_for(tok).inside
    for problem, cands in CASES:
        prompt = build_prompt(tok, problem, cands)
        assert prompt.ids() == _whole(tok, prompt)
        # a candidate's ids do not depend on its slot: shuffles re-use its encoding
        flipped = build_prompt(tok, problem, cands[::-1])
        assert flipped.candidates == prompt.candidates[::-1] and flipped.ids() == _whole(tok, flipped)


def test_byte_level_tokenizers_keep_plain_pieces(tiny):
    assert not layout_for(tiny.tokenizer).inside  # their ids never change from what they were
    for problem, cands in CASES:
        prompt = build_prompt(tiny.tokenizer, problem, cands)
        assert prompt.ids() == list(tiny.tokenizer(prompt.text)["input_ids"])


def test_given_candidate_ids_are_slots_verbatim_and_generate_has_no_cue(tiny):
    """Agent mode: each slot is exactly the given ids (leading/trailing whitespace tokens kept), blank
    lines start the next piece on every tokenizer; generate output: no answer cue, no labels."""
    for tok in (tiny.tokenizer, sentencepiece_like()):
        for problem, cands in CASES:
            given = [tuple(tok(" " + c + "\n", add_special_tokens=False)["input_ids"]) for c in cands]
            prompt = build_prompt(tok, problem, cands, candidate_ids=given)
            text_mode = build_prompt(tok, problem, cands)
            assert prompt.candidates == tuple(given) and prompt.prefix == text_mode.prefix
            assert prompt.ids() == [t for _, _, piece in prompt.pieces() for t in piece]
            enc = layout_for(tok).encode
            assert prompt.glue == tuple(enc(tok, f"\n\nCandidate #{k}:\n") for k in range(2, len(cands) + 1))
            assert prompt.suffix[: len(enc(tok, "\n\n"))] == enc(tok, "\n\n")
            assert prompt.labels == text_mode.labels
            gen = build_prompt(tok, problem, cands, output="generate")
            assert gen.labels == () and gen.candidates == text_mode.candidates
            assert not gen.text.rstrip().endswith("Best candidate: #") and f"(1 to {len(cands)})" in gen.text
            # text-mode pieces still tokenize like the whole text
            assert gen.ids() == list(template_for(tok).bos) + _whole(tok, gen)
