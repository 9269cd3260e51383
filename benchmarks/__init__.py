"""The project's benchmarks, one job per module, run from the repository root as ``python -m benchmarks.<name>``.

* ``harness``: what they share (run record with the commit, settled timing, kernel time, rows with a
  status, atomic JSON, the dense / sparse / ideal model builders);
* ``bench_ffn``, ``bench_e2e``, ``bench_decode``, ``bench_healing``: speed, each beside dense and the ideal
  (the pruned baseline for healing) measured in the same run;
* ``bench_all``: all of those sections in one run and one file (the kernel issue's rows);
* ``bench_quality``: perplexity against the baselines; ``bench_distributed``: healing over DDP / FSDP;
* ``profile_ffn``, ``profile_decode``: profiler cross-checks; ``make_report``: the docs tables from the results.
"""
