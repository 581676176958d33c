"""``kvjudge judge``: one judge method picks the best of the given candidates."""

from __future__ import annotations

import argparse
import json

from kvjudge.app.commands.common import (
    UserError,
    add_judge_modes,
    add_method_options,
    add_model,
    checked_device,
    checked_text,
    judge_max_tokens,
    judge_permutations,
    method_options_of,
    read_text,
)
from kvjudge.judges.catalog import METHOD_ORDER


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``judge``."""
    methods = ", ".join(METHOD_ORDER)
    j = sub.add_parser("judge", help="pick the best candidate with one judge method")
    add_model(j)
    j.add_argument("--method", default="dense", help=f"one of: {methods}")
    j.add_argument("--problem", required=True, help="problem text, or @file")
    j.add_argument("--candidate", action="append", default=[], help="a candidate text or @file (repeat)")
    j.add_argument("--agent-prompt", action="append", default=[],
                   help="with --candidate-kv agent: the prompt the agent answered (one for all, or one per "
                        "candidate, in order; @file allowed)")
    add_judge_modes(j, "judge_prefix")
    j.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    add_method_options(j, gate=True)
    j.set_defaults(func=cmd_judge)


def cmd_judge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.render import verdict_table
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.methods import make_method
    from kvjudge.judges.prompt import JudgeInputError
    from kvjudge.models import load_model

    options = method_options_of(args, [args.method], f"--method {args.method}")
    for name, opts in {args.method: {}, **options}.items():
        make_method(name, **opts)  # unknown method or options: fail before loading a model
    max_tokens = judge_max_tokens(args.judge_max_tokens)
    device = checked_device(args.device)
    problem = checked_text("--problem", read_text(args.problem))
    texts = [checked_text(f"--candidate {i}", read_text(c)) for i, c in enumerate(args.candidate, start=1)]
    if not texts:
        raise JudgeInputError("no candidates to judge: give at least one --candidate")
    prompts = [checked_text(f"--agent-prompt {i}", read_text(p)) for i, p in enumerate(args.agent_prompt, start=1)]
    candidates = _with_agent_prompts(texts, prompts, args.candidate_kv)
    judge = Judge(load_model(args.model, device=device), method=args.method, candidate_kv=args.candidate_kv,
                  output=args.judge_output or "label", max_new_tokens=max_tokens,
                  debias=args.judge_debias or "none", permutations=judge_permutations(args))
    judge.configure(options)
    verdict = judge.judge(problem, candidates)
    if args.json:
        print(json.dumps(verdict.to_dict()))
    else:
        Console().print(verdict_table(verdict, texts))
    return 0


def _with_agent_prompts(texts: list[str], prompts: list[str], mode: str) -> list:
    """The candidates of ``kvjudge judge``: texts, with their agents' prompts in ``agent`` mode."""
    if mode != "agent":
        if prompts:
            raise UserError("--agent-prompt only applies with --candidate-kv agent")
        return texts
    if not prompts:
        raise UserError("--candidate-kv agent needs the agents' prompts: give --agent-prompt TEXT (one for all, "
                        "or one per candidate)")
    if len(prompts) not in (1, len(texts)):
        raise UserError(f"{len(prompts)} --agent-prompt for {len(texts)} candidates: give one, or one per candidate")
    prompts = prompts * len(texts) if len(prompts) == 1 else prompts
    return [{"text": t, "agent_prompt": p} for t, p in zip(texts, prompts)]
