"""The Ray Data UDF of the DAS. Torch-free on purpose: every Ray Data worker imports this module,
and importing torch/torchrec costs seconds per fresh worker (measured: the FM pass was dominated by
worker start-up when these lived next to torch-importing code)."""

from __future__ import annotations

import time

import pyarrow as pa

from exfm_ray.das.columns import attach, first_occurrence, label_table
from exfm_ray.errors import FMUnavailable
from exfm_ray.schema import StreamSpec


class FMLabeler:
    """A thin client of the FM group for Ray Data's actor pool.

    A batch holds every tenant row of a set of examples (the driver groups rows by example_id):
    the labeler sends the first row of each example to the FM group (one FM call per example,
    however many tenants logged it) and attaches the outputs to all the batch's rows, so each batch
    comes back augmented and the driver only writes it. Thread-safe: the pool runs several calls
    per actor concurrently, keeping the FM ranks fed while a batch travels.

    Waits out a rebuilding group up to max_wait_s, then gives up on the batch (its rows get the FM
    mask off) rather than failing the window.
    """

    def __init__(self, group_name: str, namespace: str, max_wait_s: float, spec_json: str, emb_dim: int):
        import ray

        self.group = ray.get_actor(group_name, namespace=namespace)
        self.max_wait_s = max_wait_s
        self.spec = StreamSpec.from_json(spec_json)
        self.features = [*self.spec.sparse_names, *self.spec.dense]
        self.emb_dim = emb_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        unique = batch.filter(pa.array(first_occurrence(batch.column("example_id").to_numpy())))
        now = int(time.time())
        labels = self.label(unique) if unique.num_rows else None
        table = label_table(unique.column("example_id"), labels, self.spec.tenant_names, self.emb_dim, now)
        return attach(batch, table, self.spec)

    def label(self, unique: pa.Table):
        import ray

        # Only the model inputs travel to the group (it validates them and names what is missing).
        features = unique.select([c for c in self.features if c in unique.column_names])
        deadline = time.monotonic() + self.max_wait_s
        while True:
            try:
                return ray.get(self.group.label.remote(features))
            except FMUnavailable:
                if time.monotonic() > deadline:
                    return None
                time.sleep(min(2.0, self.max_wait_s / 10 + 0.1))
