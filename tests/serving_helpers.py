"""Shared by the serving tests: synthetic students published to a store, and what they should answer."""

from __future__ import annotations

import torch

from exfm_ray.serving.demo import example_rows
from exfm_ray.students.checkpoint import load_serving
from exfm_ray.students.model import ServingStudent
from exfm_ray.students.store import StudentStore


def expected_probabilities(model: ServingStudent, meta, rows: list[dict]) -> list[float]:
    """The in-process answer: the ServingStudent itself on a KJT built here, independently of rows.py."""
    from torchrec import KeyedJaggedTensor

    names = [f.name for f in meta.features]
    values = [i for f in names for r in rows for i in r["sparse"][f]]
    lengths = [len(r["sparse"][f]) for f in names for r in rows]
    kjt = KeyedJaggedTensor(keys=names, values=torch.tensor(values), lengths=torch.tensor(lengths))
    dense = (
        torch.tensor([[r["dense"][d] for d in meta.dense] for r in rows]) if meta.dense else torch.zeros(len(rows), 0)
    )
    with torch.inference_mode():
        return model(kjt, dense).tolist()


def published_model(store: StudentStore, tenant: str) -> tuple[ServingStudent, object]:
    pub = store.latest(tenant)
    assert pub is not None
    return load_serving(pub.path)


def rows_for(store: StudentStore, tenant: str, n: int, seed: int = 0) -> list[dict]:
    return example_rows(store.latest_meta(tenant), n, seed=seed)
