"""The benchmarks behind ``kvjudge bench``, one file per benchmark (nothing is imported here: each
command loads only its own stack).

* :mod:`.judge` -- ``bench judge``: every judge method timed on the same cached candidates;
* :mod:`.run` -- ``bench run``: a topology run's makespan against its lower bound
  (:mod:`kvjudge.topologies.bound`);
* :mod:`.compress` -- ``bench compress``: judge consistency vs the kept ratio of compressed candidate KV;
* :mod:`.gates` -- ``bench gates``: the reuse frontier of selective gates on held-out problems;
* :mod:`.generate` -- ``bench generate``: generation throughput per batch size (what batching buys).
"""
