"""Test data shared by several test files: the judge's add(a, b) problem and its candidates, agent-made
candidates for the agent-KV mode, and the small topologies the topology and runtime tests load."""

from __future__ import annotations

PROBLEM = "Write a function add(a, b) that returns the sum of a and b."
CANDIDATES = [
    "def add(a, b):\n    return a + b",
    "def add(a, b):\n    return a - b  # wrong",
    "add = lambda a, b: sum([a, b])",
    "def add(a, b):\n    print(a, b)",
]
TEXTS = CANDIDATES[:3]
AGENT_PROMPT = "You are a careful programmer. " + PROBLEM

# two agents, one edge: the base the topology tests edit
TWO_AGENTS = """\
name: t
agents:
  a:
    role: solver
    prompt: "Solve: {problem}"
  b:
    role: refiner
    prompt: "Improve: {previous}"
edges:
  - {source: a, target: b}
judge:
  method: naive
"""


def small_topology(max_new_tokens: int = 8, method: str = "dg_jkr") -> str:
    """A two-agent chain on tiny-llama (the runtime tests run it on Ray)."""
    return (
        "\nname: small\n"
        f"defaults: {{model: tiny-llama, max_new_tokens: {max_new_tokens}}}\n"
        "agents:\n"
        '  a: {role: solver, prompt: "Solve: {problem}"}\n'
        '  b: {role: refiner, prompt: "Improve: {previous} for {problem}"}\n'
        "edges: [{source: a, target: b}]\n"
        f"judge: {{method: {method}}}\n"
    )


def agent_candidates(lm, texts=TEXTS) -> list:
    """Candidates as agents hand them over: the ids each generated (with the leading space and trailing
    newline a generator may produce) and the ids of the chat prompt it answered."""
    from kvjudge.judges.candidate import Candidate
    from kvjudge.models.chat import agent_prompt_ids

    tok = lm.tokenizer
    prompt = tuple(agent_prompt_ids(tok, AGENT_PROMPT))
    return [Candidate(t, tuple(tok(" " + t + "\n", add_special_tokens=False)["input_ids"]), prompt, f"agent-{i}")
            for i, t in enumerate(texts)]
