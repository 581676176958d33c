"""The Ray runtime of a topology, and the bookkeeping of a run (floor 3: above ``topologies``,
below ``experiments``).

* :mod:`.runner` -- :func:`~kvjudge.runtime.runner.run`: problems in flight, agent replicas, the
  store and the judge actor of one topology on a Ray cluster;
* :mod:`.cluster` -- connecting to Ray and checking a cluster can place a run (one-line errors);
* :mod:`.telemetry` -- the Reporter protocol, run snapshots and the metrics actor the dashboard reads;
* :mod:`.results` -- the append-only ``results.jsonl`` log;
* :mod:`.manifest` -- ``OUT/manifest.json``: an output folder belongs to one run configuration.

Nothing is imported here: ``results`` and ``manifest`` stay Ray-free for those who need only them.
"""
