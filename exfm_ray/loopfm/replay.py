"""LoopFM in the one-process experiment: build the store window by window from the FM's
embeddings and hand each tenant's rows the histories of the version before their window."""

from __future__ import annotations

import tempfile

import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.loopfm.config import LoopFMConfig
from exfm_ray.loopfm.features import row_histories
from exfm_ray.loopfm.store import RepresentationStore


def attach_histories(
    cfg: LoopFMConfig,
    full: list[WindowTensors],
    tenant_rows: list[list[WindowTensors]],
    hidden: list[torch.Tensor | None],
) -> dict:
    """Per window t: every tenant part reads store version < t, then window t's FM embeddings
    (those the DAS wrote: only windows the FM labeled) are folded in as version t.

    `tenant_rows[t]`: the rows of each tenant part of window t. Returns the store's
    manifest (entities and bytes per version), for the report."""
    keys = cfg.store.keys
    for key in keys:
        full[0].spec.feature(key)  # a ConfigError naming the key if the stream lacks it
    dim = next(h.shape[1] for h in hidden if h is not None)
    with tempfile.TemporaryDirectory(prefix="exfm-loopfm-") as root:
        store = RepresentationStore(root, cfg.store, dim)
        for t, rows in enumerate(full):
            view = store.view(t)
            for part in tenant_rows[t]:
                ids = {key: part.first_ids(key) for key in keys}
                part.set_history(row_histories(view, keys, ids, pooling=cfg.pooling))
            if hidden[t] is not None:
                entities = {key: rows.first_ids(key) for key in keys}
                store.fold_arrays(t, entities, hidden[t].detach().numpy())
        return {t: v.model_dump() for t, v in store.manifest().items()}
