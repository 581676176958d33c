"""What ``rounds`` and ``{previous}`` mean: the agent requests of one problem, as pure functions.

A problem runs ``topology.rounds`` rounds. In each round every agent answers once, in topological
order of the edges: an agent is *ready* once every upstream agent (its predecessors) has answered
in this round. Its prompt is its template with ``{problem}`` and ``{previous}``, where
``{previous}`` joins, as ``[agent]`` then the text, the upstream answers of this round followed (in
rounds after the first) by every other agent's answer of the previous round. After the last round,
each agent's final answer is a judge candidate (in the topology's agent order).

No Ray and no model here: :class:`ProblemPlan` is a small state machine the runner drives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvjudge.topologies.schema import Topology


def join_previous(answers: list[tuple[str, str]]) -> str:
    """``{previous}``: each answer as ``[agent]`` then its text, separated by a blank line."""
    return "\n\n".join(f"[{agent}]\n{text}" for agent, text in answers)


def agent_request(topology: Topology, agent: str, rnd: int, problem: str, answers: dict[str, str],
                  previous_round: dict[str, str]) -> dict:
    """The request for ``agent`` in round ``rnd`` (0-based), given this round's answers so far and the
    previous round's answers: ``{"agent", "prompt", "max_new_tokens", "temperature", "seed", "round",
    "final"}``."""
    spec = topology.agent_spec(agent)
    prev = [(p, answers[p]) for p in topology.predecessors(agent) if p in answers]
    if rnd:
        prev += [(o, text) for o, text in previous_round.items() if o != agent]
    return {
        "agent": agent,
        "prompt": spec.prompt.format(problem=problem, previous=join_previous(prev)),
        "max_new_tokens": spec.max_new_tokens,
        "temperature": spec.temperature,
        "seed": spec.seed + rnd,
        "round": rnd,
        "final": rnd == topology.rounds - 1,
    }


@dataclass
class ProblemPlan:
    """The agent requests of one problem, released as their inputs arrive.

    ``ready()`` hands out requests whose upstream answers are in (each once); ``answer(agent, text)``
    records a result; ``done`` is true once the last round is answered; ``final`` then holds each
    agent's last answer.
    """

    topology: Topology
    problem: str
    round: int = 0
    answers: dict[str, str] = field(default_factory=dict)  # this round's answers so far
    previous: dict[str, str] = field(default_factory=dict)  # last round's answers
    issued: set[str] = field(default_factory=set)
    generations: list[list[str]] = field(init=False)

    def __post_init__(self) -> None:
        done: set[str] = set()
        self.generations = []
        agents = list(self.topology.agents)
        while len(done) < len(agents):  # Kahn's layers; validation already refused cycles
            layer = sorted(a for a in agents if a not in done
                           and all(p in done for p in self.topology.predecessors(a)))
            if not layer:
                raise ValueError("the topology's edges form a cycle")
            self.generations.append(layer)
            done.update(layer)

    @property
    def done(self) -> bool:
        return self.round >= self.topology.rounds

    @property
    def final(self) -> dict[str, str]:
        return self.previous if self.done else {}

    def ready(self) -> list[dict]:
        """Requests that can start now (never the same agent twice in one round)."""
        if self.done:
            return []
        out = []
        for agent in self.topology.agents:
            if agent in self.issued or agent in self.answers:
                continue
            if all(p in self.answers for p in self.topology.predecessors(agent)):
                self.issued.add(agent)
                out.append(agent_request(self.topology, agent, self.round, self.problem, self.answers,
                                         self.previous))
        return out

    def answer(self, agent: str, text: str) -> None:
        """Record ``agent``'s answer of the current round (the round ends when every agent answered)."""
        self.answers[agent] = text
        self.issued.discard(agent)
        if len(self.answers) == len(self.topology.agents):
            # in generation order whatever order the answers came in, so prompts are reproducible
            order = [a for gen in self.generations for a in gen]
            self.previous, self.answers = {a: self.answers[a] for a in order}, {}
            self.round += 1
