"""The in-process reference path of the DAS: the FM in this process, the same batch transforms.

Used as the DAS's correctness oracle in tests, as the in-process baseline of `exfm bench das`,
and wherever augmented windows are needed without a cluster (small experiments, unit tests).
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from exfm_ray.das.columns import attach, first_occurrence, label_table
from exfm_ray.data.batching import WindowTensors
from exfm_ray.fm.labels import FMLabels
from exfm_ray.fm.model import FoundationModel, build_fm
from exfm_ray.fm.registry import FMVersion, fm_window_for
from exfm_ray.schema import StreamSpec, validate_features


class SoftLabeler(Protocol):
    """Anything that labels a batch of stream rows with the FM (the FM group, or a local FM)."""

    def label(self, table: pa.Table) -> FMLabels: ...


class LocalLabeler:
    def __init__(self, model: FoundationModel, version: FMVersion):
        self.model = model.eval()
        self.version = version

    @classmethod
    def from_version(cls, version: FMVersion) -> LocalLabeler:
        from exfm_ray.fm.sharding import load_checkpoint

        model = build_fm(version.spec, version.fm)
        load_checkpoint(model, version.path)
        return cls(model, version)

    @torch.no_grad()
    def label(self, table: pa.Table) -> FMLabels:
        spec = self.version.spec
        rows = WindowTensors(validate_features(table, spec), spec)
        b = rows.batch(0, rows.num_rows, spec.sparse_names)
        out = self.model(b.sparse, b.dense)
        v = self.version
        return FMLabels(v.version, v.watermark, spec.tenant_names, out.logits.numpy(), out.hidden.numpy())


def augment_table(table: pa.Table, labeler: SoftLabeler, spec: StreamSpec, emb_dim: int) -> pa.Table:
    """Label each unique example once, attach the outputs to every tenant row (in order)."""
    keep = first_occurrence(table.column("example_id").to_numpy())
    unique = table.filter(pa.array(keep))
    labels = labeler.label(unique) if unique.num_rows else None
    now = int(time.time())
    return attach(table, label_table(unique.column("example_id"), labels, spec.tenant_names, emb_dim, now), spec)


def fm_rows_per_s(labeler: SoftLabeler, tables: list[pa.Table]) -> float:
    """Throughput of plain labeling calls (the benchmark's in-process baseline)."""
    start = time.perf_counter()
    rows = sum(labeler.label(t).num_rows for t in tables)
    return rows / (time.perf_counter() - start)


def fm_logits_for_rows(augmented: pa.Table) -> np.ndarray:
    return augmented.column("fm_logit").to_numpy(zero_copy_only=False)


def augment_windows_locally(
    stream_windows: dict[int, pa.Table], labeler: SoftLabeler, spec: StreamSpec, emb_dim: int, storage
) -> list[int]:
    """Augment and commit windows in this process (no Ray): small deployments and tests."""
    import uuid

    import pyarrow.parquet as pq

    from exfm_ray.das.store import AugmentedStore, WindowRecord

    store = AugmentedStore(storage)
    done = []
    for t, table in sorted(stream_windows.items()):
        if t in store.records():
            continue
        start = time.perf_counter()
        out = augment_table(table, labeler, spec, emb_dim)
        staged = store.staging_dir(uuid.uuid4().hex) / f"window={t}"
        staged.mkdir(parents=True)
        pq.write_table(out, staged / "part-0.parquet")
        versions = sorted({v for v in out.column("fm_version").to_pylist() if v})
        record = WindowRecord(
            window=t,
            input_rows=table.num_rows,
            output_rows=out.num_rows,
            fm_calls=_labeled_examples(out),
            fm_versions=versions,
            masked_rows=int((~out.column("fm_mask").to_numpy(zero_copy_only=False)).sum()),
            duration_s=round(time.perf_counter() - start, 3),
        )
        store.commit(t, staged, record, spec)
        done.append(t)
    store.clear_staging()
    return done


def _labeled_examples(out: pa.Table) -> int:
    labeled = out.column("fm_version").is_valid().to_numpy(zero_copy_only=False)
    return len(np.unique(out.column("example_id").to_numpy()[labeled]))


class _NoFM:
    """Windows before the first FM version: rows get no FM label (mask off)."""

    def label(self, table: pa.Table) -> None:
        return None


def augment_stream_locally(stream, storage, fm_cfg, *, fm_delay: int = 1, seed: int = 0) -> list[int]:
    """The streaming protocol in one process, for tests, benchmarks and small deployments: the FM
    trained through window t - fm_delay labels window t (windows < fm_delay get the mask off), then
    every window is committed to the AugmentedStore like the DAS would."""
    from exfm_ray.fm.learner import FMLearner

    spec = stream.spec
    torch.manual_seed(seed)
    fm = build_fm(spec, fm_cfg)
    learner = FMLearner(fm, fm_cfg, seed=seed)
    done = []
    for t, table in enumerate(stream.windows):
        labeler: SoftLabeler = _NoFM()
        k = fm_window_for(t, fm_delay)
        if k is not None:
            learner.train_window(WindowTensors(stream.windows[k], spec))
            watermark = int(stream.windows[k].column("event_time").to_numpy().max())
            version = FMVersion(version=f"local-{k:04d}", path="", watermark=watermark, through_window=k,
                                spec=spec, fm=fm_cfg)  # fmt: skip
            labeler = LocalLabeler(fm, version)
        done += augment_windows_locally({t: table}, labeler, spec, fm.hidden_dim, storage)
    return done
