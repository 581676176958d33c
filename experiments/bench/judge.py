"""``kvjudge bench judge``: every judge method timed in one run on the same, already cached inputs.

As in a pipeline, candidate segments are encoded before timing (the store would hold them), and
anchor-based methods are warmed on two other problems with the same candidates so that their
pools hold anchors; every method then judges the same problem ``repeats`` times, interleaved,
and the table reports medians and ratios to dense measured in this one run.
"""

from __future__ import annotations

import random
import statistics

from rich.progress import Progress

from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import make_method
from kvjudge.models import load_model

_WORDS = (
    "the function returns sum of list values when input is empty we raise error else loop over items "
    "and add each number to total then check edge cases like negative numbers zero or very large inputs"
).split()


def synthetic_text(tokenizer, n_tokens: int, seed: int) -> str:
    """Deterministic filler text of about ``n_tokens`` tokens (exact for byte-level tokenizers)."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < n_tokens:
        words.extend(rng.choice(_WORDS) for _ in range(max(1, (n_tokens - len(words)) // 4)))
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def bench_judge(
    model: str,
    candidates: int,
    candidate_tokens: int,
    repeats: int,
    methods: list[str],
    device: str | None = None,
    progress: bool = True,
    candidate_kv: str = "judge_prefix",
    method_options: dict | None = None,
    debias: str = "none",
    permutations: int = 1,
) -> dict:
    """Time ``methods`` (dense always included); returns ``{"config", "methods": {name: row}}``.

    In ``agent`` candidate-KV mode each synthetic candidate comes with a synthetic agent prompt, and
    its KV is the agent's (prompt + answer encoded once, as the store would hold it).

    Long on purpose: set-up, warm-up, the interleaved timing loop and the table are one measurement
    whose order matters (everything timed must run on the same warmed state); splitting it would hide that.
    """
    names = ["dense"] + [m for m in methods if m != "dense"]
    options = method_options or {}  # {method: {key: value}} (--method-option)
    for name in names:
        make_method(name, **options.get(name, {}))
    lm = load_model(model, device=device)
    judge = Judge(lm, candidate_kv=candidate_kv, debias=debias, permutations=permutations)
    judge.configure(options)
    tok = lm.tokenizer
    texts = [synthetic_text(tok, candidate_tokens, seed=i) for i in range(candidates)]
    if candidate_kv == "agent":
        texts = [{"text": t, "agent_prompt": f"Agent {i + 1}: {synthetic_text(tok, 48, seed=100 + i)}"}
                 for i, t in enumerate(texts)]
    problem = "Pick the candidate that best summarises the notes below."
    warm = [
        "Write a function that reverses the words of a sentence, keeping punctuation in place.",
        "Given a list of integers, return the length of the longest strictly increasing run.",
    ]
    for p in (*warm, problem):
        judge.prefetch(p, texts)
    for name in names:
        for p in (*warm, problem):
            judge.judge(p, texts, method=name)
    times: dict[str, list[float]] = {n: [] for n in names}
    reused: dict[str, list[bool]] = {n: [] for n in names}
    prefilled: dict[str, int] = {}
    consistent: dict[str, list] = {n: [] for n in names}  # permutation consensus: one candidate under every rotation
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("timing judge methods", total=repeats * len(names))
        for _ in range(repeats):
            for name in names:
                v = judge.judge(problem, texts, method=name)
                times[name].append(v.latency_ms)
                reused[name].append(v.reused)
                prefilled[name] = v.prefilled_tokens
                consistent[name].append((v.consensus or {}).get("consistent"))
                bar.advance(task)
    dense = statistics.median(times["dense"])
    prompt_tokens = len(judge.case(problem, texts).prompt.ids())
    rows = {}
    for name in names:
        med = statistics.median(times[name])
        rows[name] = {
            "median_ms": med,
            "ratio_to_dense": med / dense if dense > 0 else None,
            "reuse_rate": sum(reused[name]) / len(reused[name]),
            "prefilled_tokens": prefilled[name],
            "runs_ms": times[name],
            "cost_x_dense": prefilled[name] / prompt_tokens,  # prefilled tokens, as a share of one dense prefill
        }
        if permutations > 1:
            rows[name]["position_consistency"] = sum(bool(c) for c in consistent[name]) / len(consistent[name])
    config = {
        "model": model,
        "candidates": candidates,
        "candidate_tokens": candidate_tokens,
        "prompt_tokens": prompt_tokens,
        "debias": debias,
        "permutations": permutations,
        "repeats": repeats,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "candidate_kv": candidate_kv,
        "method_options": options or None,
    }
    return {"config": config, "methods": rows}
