"""Rare-positive forms of a stream: positives dropped at random, as ad traffic (CTR 0.5-3%,
conversions 0.1-1%) would look. Negatives are all kept, so the feature distribution of the
negatives and the time order are those of the original stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from exfm_ray.data.stream import LoadReport, Stream
from exfm_ray.errors import ConfigError
from exfm_ray.schema import label_column


def keep_probability(positive_rate: float, target: float) -> float:
    """q such that keeping each positive with probability q turns rate p into target:
    q p / (q p + 1 - p) = target."""
    if not 0 < target < 1:
        raise ConfigError(f"field 'positive_rate': must be in (0, 1), got {target}")
    if positive_rate <= target:
        return 1.0
    return target * (1 - positive_rate) / (positive_rate * (1 - target))


def thin_positives(stream: Stream, target: float, seed: int = 0) -> Stream:
    """Drop positive rows at random so the stream's positive rate (of its first task) is about `target`.

    The draw is per example_id, so an example logged by several tenants keeps or loses all its rows
    (tenants keep identical labels for a shared example). Dropped rows are counted in the report.
    """
    label = label_column(stream.spec.tasks[0])
    y = np.concatenate([w.column(label).to_numpy() for w in stream.windows])
    q = keep_probability(float(y.mean()), target)
    windows, dropped = [], 0
    for t, table in enumerate(stream.windows):
        ids = table.column("example_id").to_numpy()
        positive = table.column(label).to_numpy() > 0.5
        # One draw per example id, shared by every tenant row of that example.
        unique, row_of = np.unique(ids, return_inverse=True)
        keep_id = np.random.default_rng([seed, t]).random(len(unique)) < q
        keep = ~positive | keep_id[row_of]
        dropped += int((~keep).sum())
        windows.append(table.filter(pa.array(keep)))
    rate = float(np.concatenate([w.column(label).to_numpy() for w in windows]).mean())
    spec = stream.spec.model_copy(
        update={
            "name": f"{stream.spec.name}-rare",
            "description": f"{stream.spec.description}; rare-positive form (target {target:g}): positives kept "
            f"with probability {q:.4f} (seed {seed}), positive rate {y.mean():.4f} -> {rate:.4f}",
        }
    )
    why = f"positives dropped at random to a {target:g} positive rate"
    report = LoadReport(stream.report.rows_read, {**stream.report.excluded, why: dropped})
    return Stream(spec, windows, report)
