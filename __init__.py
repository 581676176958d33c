"""kvjudge: multi-agent LLM pipelines with a judge that reuses shared KV caches.

The repository root is the import package; its folders are the subpackages, in floors that import
one way, ground floor first (``tests/test_layout.py`` guards it):

0. ``kvjudge.cache`` (KV segments and re-indexing, the encoder, the byte-budgeted store and its
   Ray actor, eviction and compression), ``kvjudge.models`` (model loading: tiny, SmolLM2, the
   simulated model) and ``kvjudge.sandbox`` (runs untrusted code; imports nothing from kvjudge);
1. ``kvjudge.judges`` (prompt layout, candidate KV modes, methods, engine, Ray actor) and
   ``kvjudge.agents`` (generation, the simulated agent, Ray actor);
2. ``kvjudge.topologies`` (the YAML schema, loader, plan and the makespan bound; pure, no Ray);
3. ``kvjudge.runtime`` (the Ray runtime: runner, cluster, telemetry; the results log and manifest);
4. ``kvjudge.experiments`` (data sets and graders, the evaluation protocol, metrics, reports,
   benchmarks, diagnostics);
5. ``kvjudge.app`` (CLI, reporters, dashboard).
"""

__version__ = "0.1.0"
