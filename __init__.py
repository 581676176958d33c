"""kvjudge: multi-agent LLM pipelines with a judge that reuses shared KV caches.

The repository root is the import package; its folders are the subpackages:
``kvjudge.cache`` (pure KV tensor ops), ``kvjudge.judges`` (prompt, scoring, methods),
``kvjudge.agents`` (models, generation), ``kvjudge.topologies``, ``kvjudge.experiments``
and ``kvjudge.app`` (CLI, Ray glue, dashboard).
"""

__version__ = "0.1.0"
