"""Prometheus metrics (via Ray's metrics agent) and one-line logs of what happened.

Ray exports every ray.util.metrics metric on each node's metrics endpoint (scraped by
Prometheus; `ray metrics launch-prometheus` locally). Names are prefixed `exfm_`, and Ray
prefixes `ray_` on export (`exported_name`). Metrics are created lazily inside the process that
records them (an actor, a trainer, the DAS driver). deploy/grafana/exfm-dashboard.json has a
panel for each (tests/unit/test_dashboard.py keeps the two in step).
"""

from __future__ import annotations

import logging
from functools import cache

LOG = logging.getLogger("exfm")

LATENCY_BOUNDARIES_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@cache
def counter(name: str, description: str, tags: tuple[str, ...] = ()):
    from ray.util.metrics import Counter

    return Counter(f"exfm_{name}", description=description, tag_keys=tags)


@cache
def gauge(name: str, description: str, tags: tuple[str, ...] = ()):
    from ray.util.metrics import Gauge

    return Gauge(f"exfm_{name}", description=description, tag_keys=tags)


@cache
def histogram(name: str, description: str, tags: tuple[str, ...] = (), boundaries: tuple[float, ...] = ()):
    from ray.util.metrics import Histogram

    return Histogram(
        f"exfm_{name}", description=description, boundaries=list(boundaries or LATENCY_BOUNDARIES_S), tag_keys=tags
    )


def exported_name(kind: str, name: str) -> str:
    """The Prometheus series Ray 2.60 exports for metric `name` made here (checked against a live
    export): `ray_exfm_<name>`, counters with OpenMetrics' `_total`, histograms as `_bucket`
    (with `_sum` and `_count`)."""
    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}[kind]
    return f"ray_exfm_{name}{suffix}"
