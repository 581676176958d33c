"""``kvjudge bench compress``: judge consistency vs kept ratio of the stored candidate KV.

For every candidate set (a JSONL line ``{"task_id", "problem"?, "candidates", "sources"?}``) and shuffle
seed, the judge runs dense and every judge method on the uncompressed candidates, then, for every
(compression method, kept ratio), with each candidate's cached KV replaced by its compressed version
(encoded after the judge prefix, as the store would hold it; the prefix and glue stay whole). Per point
(``method``, ``ratio``, ``judge_method``) it reports ``jcr`` against the uncompressed dense judge,
``jcr_vs_uncompressed`` against the same judge method uncompressed, ``accuracy`` (GSM8K / MMLU),
``store_bytes`` (the compressed candidates' bytes, each distinct candidate once) and ``latency_ms``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvjudge.cache.compress.registry import CompressError, compress_segment
from kvjudge.cache.encoder import KVRunner
from kvjudge.experiments.data import DataError, iter_jsonl
from kvjudge.experiments.datasets import get_dataset, is_dataset, load_dataset
from kvjudge.experiments.judging import permutation, to_original
from kvjudge.experiments.metrics import jcr
from kvjudge.judges.judge import Judge
from kvjudge.models import LoadedModel, load_model

GRADED = ("gsm8k", "mmlu")


def read_candidate_sets(path: str | Path, dataset: str | None = None, limit: int | None = None) -> list[dict]:
    """Candidate sets with their ``problem`` text (looked up by task id in ``dataset`` when a line lacks
    it; the dataset defaults to the task id's prefix, ``gsm8k/7`` -> ``gsm8k``) and reference problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--candidates {str(path)!r}: no such file")
    sets = []
    for n, item in iter_jsonl(path):
        if not isinstance(item, dict) or "task_id" not in item or not isinstance(item.get("candidates"), list):
            raise DataError(f"{path}:{n}: expected {{\"task_id\", \"candidates\": [...]}}")
        sets.append(item)
        if limit and len(sets) >= limit:
            break
    names = {dataset} if dataset else {str(s["task_id"]).split("/")[0] for s in sets if "problem" not in s}
    refs: dict[str, dict] = {}
    for name in names:
        if is_dataset(name):
            refs.update({str(p["id"]): {**p, "dataset": get_dataset(name).name} for p in load_dataset(name)})
    for s in sets:
        ref = refs.get(str(s["task_id"]))
        if "problem" not in s:
            if ref is None:
                raise DataError(f"task {s['task_id']!r} has no problem text and no dataset names it (pass the dataset)")
            s["problem"] = ref["prompt"]
        s["reference"] = ref
    return sets


def _grades(s: dict) -> list[bool] | None:
    ref = s.get("reference")
    if not ref or ref.get("dataset") not in GRADED:
        return None
    ds = get_dataset(ref["dataset"])
    return [bool(ds.grade(ref, text)) for text in s["candidates"]]


def _kv_items(judge: Judge, s: dict) -> list[tuple[str, object, object]]:
    """``(store key, dense candidate KV, prefix KV)`` per distinct candidate of a set, as the judge looks them up."""
    runner: KVRunner = judge.runner
    out = {}
    for text in s["candidates"]:
        req = judge.candidate_kv_request(s["problem"], text)
        if req["key"] not in out:
            out[req["key"]] = (req["key"], runner.encode(req["context_ids"], req["ids"]), runner.context(req["context_ids"]))
    return list(out.values())


def _judge_all(judge: Judge, s: dict, seeds: Sequence[int], methods: Sequence[str]) -> dict:
    """``{(seed, method): (original winner, latency_ms)}``."""
    out = {}
    n = len(s["candidates"])
    for seed in seeds:
        perm = permutation(seed, str(s["task_id"]), n)
        cands = [s["candidates"][i] for i in perm]
        sources = [s["sources"][i] for i in perm] if s.get("sources") else None
        for m in methods:
            v = judge.judge(s["problem"], cands, m, sources)
            out[(seed, m)] = (to_original(perm, v.winner), v.latency_ms)
    return out


def bench_compress(
    candidates_path: str | Path,
    model: str | LoadedModel = "smollm2-135m",
    methods: Sequence[str] = ("laprox", "streaming", "snapkv", "knorm", "random"),
    ratios: Sequence[float] = (1.0, 0.5, 0.25, 0.1, 0.05),
    judge_methods: Sequence[str] = ("naive", "dg_jkr"),
    candidate_kv: str | None = None,
    seeds: Sequence[int] = (42,),
    limit: int | None = None,
    out_dir: str | Path | None = None,
    dataset: str | None = None,
) -> dict:
    """Sweep kept ratio x compression method (see the module docstring); writes ``compress.json`` and
    ``compress_jcr.png`` into ``out_dir`` when given and returns the same dict."""
    if candidate_kv not in (None, "judge_prefix"):
        raise CompressError(f"candidate KV mode {candidate_kv!r} is not supported by bench compress yet (judge_prefix only)")
    if "none" in methods:
        raise CompressError("'none' is the uncompressed reference every point is compared with; leave it out of --methods")
    for r in ratios:
        if not 0 < float(r) <= 1:
            raise CompressError(f"kept ratio must be in (0, 1], not {r!r}")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    sets = read_candidate_sets(candidates_path, dataset, limit)
    judge = Judge(lm, "dense")
    judge_methods = list(judge_methods)
    rows: dict[tuple, dict] = {}
    base: dict[str, dict] = {m: {"winners": [], "dense": [], "correct": [], "latency": []} for m in judge_methods}
    dense_bytes = 0
    for s in sets:
        grades = _grades(s)
        items = _kv_items(judge, s)
        dense_bytes += sum(seg.nbytes for _, seg, _ in items)
        ref = _judge_all(judge, s, seeds, ["dense", *judge_methods])
        for m in judge_methods:
            for seed in seeds:
                b = base[m]
                b["winners"].append(ref[(seed, m)][0]), b["dense"].append(ref[(seed, "dense")][0])
                b["latency"].append(ref[(seed, m)][1])
                if grades:
                    b["correct"].append(grades[ref[(seed, m)][0]])
        for method in methods:
            for ratio in ratios:
                comp = [(key, compress_segment(seg, lm.model, method, ratio, context=ctx)) for key, seg, ctx in items]
                for key, c in comp:
                    judge.runner.remember(key, c)
                try:
                    got = {}
                    for m in judge_methods:
                        try:
                            got.update(_judge_all(judge, s, seeds, [m]))
                        except Exception as exc:  # e.g. a method that edits candidate KV token by token
                            got.update({(seed, m): (None, float("nan")) for seed in seeds})
                            rows.setdefault((method, float(ratio), m), {}).setdefault("error", f"{type(exc).__name__}: {exc}")
                finally:
                    for key, seg, _ in items:
                        judge.runner.remember(key, seg)
                for m in judge_methods:
                    row = rows.setdefault((method, float(ratio), m), {})
                    row.setdefault("bytes", 0)
                    row["bytes"] += sum(c.nbytes for _, c in comp)
                    for seed in seeds:
                        w, lat = got[(seed, m)]
                        row.setdefault("winners", []).append(w)
                        row.setdefault("dense", []).append(ref[(seed, "dense")][0])
                        row.setdefault("uncompressed", []).append(ref[(seed, m)][0])
                        row.setdefault("latency", []).append(lat)
                        if grades:
                            row.setdefault("correct", []).append(grades[w] if w is not None else False)
    points = []
    for (method, ratio, m), row in rows.items():
        lat = [x for x in row["latency"] if x == x]
        if "error" in row:  # the judge method cannot run on compressed candidates: no numbers
            points.append({"method": method, "ratio": ratio, "judge_method": m, "jcr": None, "jcr_vs_uncompressed": None,
                           "accuracy": None, "store_bytes": row["bytes"], "latency_ms": None, "error": row["error"]})
            continue
        points.append({
            "method": method, "ratio": ratio, "judge_method": m,
            "jcr": jcr(row["winners"], row["dense"]),
            "jcr_vs_uncompressed": jcr(row["winners"], row["uncompressed"]),
            "accuracy": sum(row["correct"]) / len(row["correct"]) if row.get("correct") else None,
            "store_bytes": row["bytes"], "store_ratio": row["bytes"] / dense_bytes if dense_bytes else None,
            "latency_ms": sum(lat) / len(lat) if lat else None,
        })
    uncompressed = {m: {"jcr": jcr(b["winners"], b["dense"]),
                        "accuracy": sum(b["correct"]) / len(b["correct"]) if b["correct"] else None,
                        "store_bytes": dense_bytes, "latency_ms": sum(b["latency"]) / len(b["latency"])}
                    for m, b in base.items()}
    result = {"model": lm.model_id, "candidates": str(candidates_path), "problems": len(sets), "seeds": list(seeds),
              "methods": list(methods), "ratios": [float(r) for r in ratios], "judge_methods": judge_methods,
              "uncompressed": uncompressed, "points": points}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compress.json").write_text(json.dumps(result, indent=2) + "\n")
        result["plot"] = str(plot_compress(result, out / "compress_jcr.png"))
    return result


def plot_compress(result: dict, path: Path) -> Path:
    """JCR (vs the dense judge) against kept ratio, one line per compression method, one panel per judge method."""
    import matplotlib  # function-body import: matplotlib is only needed when a plot is written

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    jms = result["judge_methods"]
    fig, axes = plt.subplots(1, len(jms), figsize=(5 * len(jms), 4), squeeze=False)
    for ax, jm in zip(axes[0], jms):
        for method in result["methods"]:
            pts = sorted((p["ratio"], p["jcr"]) for p in result["points"]
                         if p["method"] == method and p["judge_method"] == jm and "error" not in p)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(result["uncompressed"][jm]["jcr"], color="grey", linestyle="--", label="uncompressed")
        ax.set_xscale("log")
        ax.set_xlabel("kept ratio of candidate KV")
        ax.set_ylabel("JCR vs dense judge")
        ax.set_title(f"{jm} ({result['model']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
