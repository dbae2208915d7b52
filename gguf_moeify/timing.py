"""Wall time of a conversion by phase and layer, for the scaling benchmark (scripts/bench_scaling.py).

Off (a no-op) unless ``GGUF_MOEIFY_TIMING`` is set: to a file path, one JSON line per ``record`` call is appended
(the phases timed since the previous call: wall seconds, and the process's CPU seconds under NAME_cpu, which
other processes' load on a shared machine inflates less; plus the caller's fields, the wall clock and the
process's peak RSS so far); to ``stderr``, the same lines go to stderr. The calibration pipeline records one
line per layer with its phases (load, attention, plan, moe_forward); a method's own phases (statistics,
partition, router) are timed inside "plan".
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager

ENV = "GGUF_MOEIFY_TIMING"
_phases: dict[str, float] = {}


def enabled() -> bool:
    return bool(os.environ.get(ENV))


@contextmanager
def phase(name: str):
    """Add the wall time of the block to phase ``name`` (when timing is on)."""
    if not enabled():
        yield
        return
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        _phases[name] = _phases.get(name, 0.0) + time.perf_counter() - start
        _phases[name + "_cpu"] = _phases.get(name + "_cpu", 0.0) + time.process_time() - cpu


def record(**fields) -> None:
    """One line: ``fields``, the phases timed since the last line, the wall clock and the peak RSS (MiB)."""
    target = os.environ.get(ENV)
    if not target:
        return
    line = {**fields, **{k: round(v, 4) for k, v in _phases.items()}, "wall": round(time.time(), 3),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    _phases.clear()
    text = json.dumps(line) + "\n"
    if target == "stderr":
        sys.stderr.write(text)
        return
    with open(target, "a", encoding="utf-8") as f:
        f.write(text)
