"""Helpers the commands share: window ranges, quiet Ray Data, the example request."""

from __future__ import annotations

import json
import shlex

from exfm_ray.errors import ConfigError
from exfm_ray.serving.schema import PREDICT_PATH


def parse_windows(text: str) -> list[int]:
    """'3' -> [3]; '2:5' -> [2, 3, 4, 5] (inclusive, like the issue's A:B)."""
    try:
        if ":" in text:
            a, b = (int(x) for x in text.split(":", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise ConfigError(f"--windows {text!r}: expected A:B or a single window number") from None
    if a < 0 or b < a:
        raise ConfigError(f"--windows {text!r}: need 0 <= A <= B")
    return list(range(a, b + 1))


def quiet_ray_data() -> None:
    """Our bar and summary lines say what happened; Ray Data's per-operator bars would bury them."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False  # Ray Data's log lines: jobs/cluster.connect lowers its logger


def curl_example(url: str, store, tenant: str) -> str:
    """A copy-paste request for one of the tenant's rows."""
    from exfm_ray.serving.demo import example_rows

    body = json.dumps({"rows": example_rows(store.latest_meta(tenant), 1)})
    route = url + PREDICT_PATH.format(tenant=tenant)
    return f"curl -s -X POST {route} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
