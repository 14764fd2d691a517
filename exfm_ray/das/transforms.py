"""The Ray Data UDFs of the DAS. Torch-free on purpose: every Ray Data worker imports this module,
and importing torch/torchrec costs seconds per fresh worker (measured: the FM pass was dominated by
worker start-up when these lived next to torch-importing code)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from exfm_ray.das.columns import attach, label_table
from exfm_ray.das.label_join import LabelJoinConfig, join_labels
from exfm_ray.errors import FMUnavailable
from exfm_ray.schema import StreamSpec


class FMLabeler:
    """A thin client of the FM group for Ray Data's actor pool. Waits out a rebuilding group up to
    max_wait_s, then gives up on the batch (its rows get the FM mask off) rather than failing the
    window."""

    def __init__(self, group_name: str, namespace: str, max_wait_s: float, heads: list[str], emb_dim: int):
        import ray

        self.group = ray.get_actor(group_name, namespace=namespace)
        self.max_wait_s = max_wait_s
        self.heads, self.emb_dim = heads, emb_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        deadline = time.monotonic() + self.max_wait_s
        while True:
            try:
                labels = ray.get(self.group.label.remote(batch))
                break
            except FMUnavailable:
                if time.monotonic() > deadline:
                    labels = None
                    break
                time.sleep(min(2.0, self.max_wait_s / 10 + 0.1))
        return label_table(batch.column("example_id"), labels, self.heads, self.emb_dim, int(time.time()))


def keep_first(batch: pa.Table, first: pa.Table) -> pa.Table:
    """Rows that are the first occurrence of their example_id (`first`: example_id -> its tenant)."""
    pos = pc.index_in(batch.column("example_id"), value_set=first.column("example_id"))
    first_tenant = first.column("tenant").take(pc.fill_null(pos, 0))
    return batch.filter(pc.fill_null(pc.equal(batch.column("tenant"), first_tenant), False))


def attach_labels(
    batch: pa.Table, labels: pa.Table, spec_json: str, label_cfg: dict | None, events: pa.Table | None
) -> pa.Table:
    """FM outputs onto every tenant row, then the delayed labels (when a label stream is configured)."""
    spec = StreamSpec.from_json(spec_json)
    out = attach(batch, labels, spec)
    if label_cfg is not None:
        out, _ = join_labels(out, events, spec, LabelJoinConfig.model_validate(label_cfg))
    return out
