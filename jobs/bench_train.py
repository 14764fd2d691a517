"""`exfm bench train`: one tenant's training in a plain in-process loop vs in Ray Train, and two
tenants at once vs one, in one run on the same machine.

Every arm runs the same TenantRun over the same augmented windows with one torch thread, and
rows/s counts the tenant rows evaluated and trained from the start of its first window to the end
of its last. The Ray runs wait in follow mode until the windows are committed, all at once, so
concurrent tenants start together and process start-up stays out of the rates (it is reported on
its own as `ray_startup_s`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from actors.launch import fit_tenant_task
from exfm_ray.das.local import augment_stream_locally
from exfm_ray.das.store import AugmentedStore
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.tenants.config import TenantConfig, resolve
from exfm_ray.tenants.registry import TenantRegistry
from exfm_ray.tenants.run import TenantRun
from exfm_ray.tenants.trainer import TenantRunConfig


def run_train_bench(*, rows_per_window: int, windows: int, rounds: int = 2, log=print) -> dict:
    """Arms alternate for `rounds` rounds and each keeps its best round, so a neighbour's load
    on a shared machine does not decide the ratio."""
    work = Path(tempfile.mkdtemp(prefix="exfm-bench-train-"))
    try:
        stream = SyntheticStream(SyntheticConfig(num_windows=windows, rows_per_window=rows_per_window)).stream()
        augment_stream_locally(stream, work / "source", FMConfig(size=2))
        source = AugmentedStore(work / "source")
        tenant = TenantConfig(name="feed")
        twins = [tenant, TenantConfig(name="feed_twin", rows=["feed"], seed=1)]
        plains, ones, twos = [], [], []
        for r in range(rounds):
            plains.append(_plain(source, tenant, windows))
            log(
                f"round {r}: plain in-process loop {plains[-1]['rows_per_s']:,.0f} rows/s ({plains[-1]['rows']:,} rows)"
            )
            ones.append(_ray(source, work / f"one{r}", [tenant], windows))
            startup = ones[-1]["startup_s"]
            log(f"round {r}: Ray Train, 1 tenant {ones[-1]['rows_per_s']:,.0f} rows/s (start-up {startup:.1f} s)")
            twos.append(_ray(source, work / f"two{r}", twins, windows))
            log(f"round {r}: Ray Train, 2 tenants at once {twos[-1]['rows_per_s']:,.0f} rows/s together")
        plain, one, two = (max(arm, key=lambda x: x["rows_per_s"]) for arm in (plains, ones, twos))
        return {
            "plain_rows_per_s": plain["rows_per_s"],
            "ray_rows_per_s": one["rows_per_s"],
            "ratio": one["rows_per_s"] / plain["rows_per_s"],
            "one_tenant_rows_per_s": one["rows_per_s"],
            "two_tenants_rows_per_s": two["rows_per_s"],
            "scaling": two["rows_per_s"] / one["rows_per_s"],
            "ray_startup_s": one["startup_s"],
            "rows_per_tenant": plain["rows"],
            "windows": windows,
            "rows_per_window": rows_per_window,
            "torch_threads": 1,
            "rounds": rounds,
            "all_rounds_rows_per_s": {
                "plain": [x["rows_per_s"] for x in plains],
                "one_tenant": [x["rows_per_s"] for x in ones],
                "two_tenants": [x["rows_per_s"] for x in twos],
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _plain(source: AugmentedStore, tenant: TenantConfig, windows: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray Train worker
    try:
        view = resolve(tenant, source.spec())
        run = TenantRun(view)
        for t in range(windows):
            run.window(t, source.read_window(t, columns=view.columns))
    finally:
        torch.set_num_threads(threads)
    return _rate([run.history])


def _ray(source: AugmentedStore, storage: Path, tenants: list[TenantConfig], windows: int) -> dict:
    registry = TenantRegistry(storage)
    entries = [registry.add(t) for t in tenants]
    launched = time.time()
    refs = [
        fit_tenant_task().remote(
            TenantRunConfig(storage=str(storage), entry=e, last_window=windows - 1, follow=True, poll_s=0.05)
        )  # fmt: skip
        for e in entries
    ]

    def waiting(name: str) -> bool:
        p = registry.read_json(registry.progress_path(name)) or {}
        return p.get("phase") == "waiting"

    while not all(waiting(t.name) for t in tenants):
        finished, _ = ray.wait(refs, timeout=0.1)
        if finished:  # a run ended before the windows came: surface its error
            ray.get(finished)
            raise RuntimeError("a tenant run ended before its windows were committed")
    ready = time.time()
    _commit_all(source, storage, windows)
    ray.get(refs)
    histories = [registry.read_json(registry.metrics_path(t.name)) for t in tenants]
    return {**_rate(histories), "startup_s": ready - launched}


def _commit_all(source: AugmentedStore, storage: Path, windows: int) -> None:
    store = AugmentedStore(storage)
    for t in range(windows):
        staged = store.staging_dir(f"bench{t}") / f"window={t}"
        shutil.copytree(source.window_dir(t), staged)
        store.commit(t, staged, source.records()[t], source.spec())


def _rate(histories: list[list[dict]]) -> dict:
    rows = sum(r["rows"] for h in histories for r in h)
    start = min(h[0]["started_at"] for h in histories)
    end = max(h[-1]["ended_at"] for h in histories)
    return {"rows": rows, "rows_per_s": rows / (end - start)}
