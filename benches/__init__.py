"""Benchmark harnesses, started by `exfm bench <what>`.

Each module is one benchmark: a typed `...BenchConfig`, `run(cfg) -> dict` (figures, ratios against
a baseline measured in the same run) and `summary(results) -> str` (what the CLI prints). A harness
runs on the Ray the command has joined and never starts or stops Ray itself. Layering:
exfm_ray < actors < benches < jobs.
"""
