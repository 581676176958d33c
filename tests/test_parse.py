"""The rule that reads the chosen candidate out of a generated judge answer (judges/parse.py)."""

from __future__ import annotations

import pytest

from kvjudge.judges.parse import RULES, parse_choice

# (answer text, number of candidates, expected winner, expected rule)
TABLE = [
    # valid: the answer statement the instruction asks for, anywhere, first valid one wins
    ("Best candidate: #2", 4, 2, "explicit"),
    ("best candidate is 3.\nCandidate 1 is wrong.", 4, 3, "explicit"),
    ("Candidate 1 fails the tests.\nBest candidate: #4 because it adds.", 4, 4, "explicit"),
    ("Best Candidate - Candidate #1", 2, 1, "explicit"),
    ("Best candidate: #7\nBest candidate: #2", 4, 2, "explicit"),  # 7 is not a slot: skipped
    ("Best candidate: #2, yes #2.", 3, 2, "explicit"),  # a repeat is not ambiguous
    # valid: a mention, then a bare number
    ("I pick #3.", 3, 3, "mention"),
    ("I would go with Candidate 2; it handles negatives.", 3, 2, "mention"),
    ("Looking at them...\ncandidate #1 is the only correct one", 2, 1, "mention"),
    ("2", 4, 2, "bare"),
    ("  (3).  \nIt is shorter.", 4, 3, "bare"),
    # ambiguous: two different slots in the deciding line
    ("Best candidate: #1 or best candidate #2", 3, None, "ambiguous"),
    ("Candidate 1 and Candidate 3 are both correct.", 3, None, "ambiguous"),
    ("#1, #2", 2, None, "ambiguous"),
    # none: no rule applies
    ("", 3, None, "none"),
    ("All of them look fine to me.", 3, None, "none"),
    ("Best candidate: #5", 4, None, "none"),  # out of range everywhere
    ("The sum of 2 and 3 is 5.", 4, None, "none"),  # numbers inside prose are not choices
    ("The second one.", 3, None, "none"),  # number words are not read
    ("2 is best", 3, None, "none"),  # a bare number must be the whole first line
]


@pytest.mark.parametrize("text,n,winner,rule", TABLE)
def test_parse_rule_table(text, n, winner, rule):
    assert parse_choice(text, n) == (winner, rule)
    assert rule in RULES


def test_every_rule_is_exercised():
    assert {row[3] for row in TABLE} == set(RULES)
