"""The long-lived FM actor group: a supervisor owning R replicas ("gangs") of N FMShard ranks.

- label(): validates the batch (a bad batch fails alone, naming the column), picks a ready gang,
  splits the rows across its ranks, runs them in lockstep and gathers in order.
- switch(): loads another FM version; calls already submitted finish on the old version, calls
  submitted after it see the new one, and every answer names the version that produced it.
- A rank that dies (or a call that times out) breaks its gang: a sharded model cannot lose one
  rank, so the whole gang is killed and rebuilt from the current version's checkpoint while calls
  fail fast with FMUnavailable (retryable) or go to another ready gang. Never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Literal

import pyarrow as pa
from pydantic import Field

from actors.remote import shard_actor_class
from exfm_ray.configbase import Config
from exfm_ray.errors import ConfigError, FMUnavailable
from exfm_ray.fm.config import ShardingConfig
from exfm_ray.fm.labels import FMLabels, gather, split_padded
from exfm_ray.fm.registry import FMRegistry, FMVersion
from exfm_ray.fm.status import GangStatus, GroupStatus
from exfm_ray.observability import LOG, counter, gauge, histogram
from exfm_ray.schema import validate_features


class FMGroupConfig(Config):
    name: str = Field("exfm-fm", description="Ray actor name of the supervisor (jobs find the group by it).")
    namespace: str = Field("exfm", description="Ray namespace of the supervisor.")
    storage: str = Field(description="Storage root holding the FM registry (fm/registry.json).")
    num_shards: int = Field(2, ge=1, description="Ranks per gang: the FM is sharded over them.")
    num_replicas: int = Field(1, ge=1, description="Gangs: independent sharded copies serving in parallel.")
    cpus_per_shard: float = Field(1.0, gt=0, description="CPUs reserved per rank.")
    gpus_per_shard: float = Field(0.0, ge=0, description="GPUs per rank (1 in production).")
    shard_resources: dict[str, float] = Field(
        default_factory=dict, description='Custom resources per rank, e.g. {"fm_shard": 1} to pin FM nodes.'
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement group strategy for a gang's ranks."
    )
    threads_per_shard: int = Field(1, ge=1, description="torch threads per rank.")
    sharding: ShardingConfig = Field(default_factory=ShardingConfig, description="Backend and sharding type.")
    call_timeout_s: float = Field(60.0, gt=0, description="A gang call slower than this breaks the gang.")
    setup_timeout_s: float = Field(180.0, gt=0, description="Time allowed to start (or rebuild) a gang.")
    max_rows_per_call: int = Field(65_536, gt=0, description="Larger batches are refused (split them).")


class Gang:
    """N ranks in one placement group, sharing one process group."""

    def __init__(self, index: int, cfg: FMGroupConfig):
        self.index = index
        self.cfg = cfg
        self.status = "starting"
        self.ranks: list = []
        self.pg = None
        self.version: FMVersion | None = None
        self.in_flight = 0
        self.rebuilds = 0
        self.error = ""

    async def start(self, version: FMVersion) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        if self.pg is None:
            bundle = {"CPU": cfg.cpus_per_shard, **cfg.shard_resources}
            if cfg.gpus_per_shard:
                bundle["GPU"] = cfg.gpus_per_shard
            self.pg = placement_group([bundle] * cfg.num_shards, strategy=cfg.placement_strategy)
            await asyncio.wait_for(self.pg.ready(), cfg.setup_timeout_s)
        shard_cls = shard_actor_class()
        self.ranks = [
            shard_cls.options(
                num_cpus=cfg.cpus_per_shard,
                num_gpus=cfg.gpus_per_shard,
                resources=cfg.shard_resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, cfg.num_shards, cfg.threads_per_shard)
            for r in range(cfg.num_shards)
        ]
        master = await self.ranks[0].address.remote()
        setup = [
            r.setup.remote(master, version.model_dump(mode="json"), cfg.sharding.model_dump(), cfg.call_timeout_s)
            for r in self.ranks
        ]
        self.infos = await _all(setup, cfg.setup_timeout_s)
        self.version = version
        self.status = "ready"
        self.error = ""

    async def label(self, table: pa.Table) -> FMLabels:
        chunks, real = split_padded(table, len(self.ranks))
        version = self.version
        assert version is not None
        # Submitted to every rank with no await in between: each rank sees calls in the same order.
        refs = [rank.forward.remote(chunk) for rank, chunk in zip(self.ranks, chunks, strict=True)]
        self.in_flight += 1
        try:
            outs = await _all(refs, self.cfg.call_timeout_s)
        except Exception as exc:
            raise self.broken(exc) from None
        finally:
            self.in_flight -= 1
        logits = gather([o[0] for o in outs], real)
        hidden = gather([o[1] for o in outs], real)
        return FMLabels(version.version, version.watermark, version.spec.tenant_names, logits, hidden)

    async def switch(self, version: FMVersion) -> None:
        refs = [rank.load.remote(version.model_dump(mode="json")) for rank in self.ranks]
        self.version = version  # calls submitted from now on run after the load on every rank
        try:
            self.infos = await _all(refs, self.cfg.setup_timeout_s)
        except Exception as exc:
            raise self.broken(exc) from None

    def broken(self, exc: BaseException) -> FMUnavailable:
        """Mark the gang broken (the supervisor rebuilds it) and say so to the caller."""
        if self.status == "ready":
            self.status = "broken"
            self.error = f"{type(exc).__name__}: {exc}"[:300]
        return FMUnavailable(f"FM gang {self.index} failed ({self.error}); it is being rebuilt, retry")

    def kill(self) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.ranks = []

    def describe(self) -> GangStatus:
        return GangStatus(
            gang=self.index,
            status=self.status,
            version=self.version.version if self.version else None,
            ranks=len(self.ranks),
            in_flight=self.in_flight,
            rebuilds=self.rebuilds,
            error=self.error,
            plan=self.infos[0]["plan"] if getattr(self, "infos", None) else {},
        )


class FMGroup:
    """Supervisor of the FM gangs; an async Ray actor, so concurrent callers interleave safely."""

    def __init__(self, cfg: FMGroupConfig):
        self.cfg = cfg
        self.registry = FMRegistry(cfg.storage)
        self.gangs = [Gang(i, cfg) for i in range(cfg.num_replicas)]
        self.version: FMVersion | None = None
        self.started_at = time.time()
        self.rows_labeled = 0
        self.calls = 0
        self.failed_calls = 0
        self._next = itertools.count()
        self._rebuilding: set[int] = set()

    async def start(self, version: str | None = None) -> GroupStatus:
        meta = self._resolve(version)
        await asyncio.gather(*(g.start(meta) for g in self.gangs))
        self.version = meta
        self._publish_version_gauge()
        return self.status()

    async def label(self, table: pa.Table) -> FMLabels:
        """FM logits, probabilities (via .probs) and embeddings for every row, in order."""
        if self.version is None:
            raise FMUnavailable("the FM group has not started")
        if table.num_rows > self.cfg.max_rows_per_call:
            raise ConfigError(f"batch of {table.num_rows} rows exceeds max_rows_per_call {self.cfg.max_rows_per_call}")
        features = validate_features(table, self.version.spec)
        if features.num_rows == 0:
            v = self.version
            return FMLabels(v.version, v.watermark, v.spec.tenant_names, _empty(len(v.spec.tenants)), _empty(0))
        gang = self._pick()
        self.calls += 1
        started = time.perf_counter()
        try:
            out = await gang.label(features)
        except FMUnavailable:
            self.failed_calls += 1
            counter("fm_failed_calls", "FM group calls that failed (retryable)", ("group",)).inc(
                1, {"group": self.cfg.name}
            )
            self._rebuild_soon(gang)
            raise
        self.rows_labeled += out.num_rows
        tags = {"group": self.cfg.name, "version": out.version}
        counter("fm_rows_labeled", "Rows labeled by the FM group", ("group", "version")).inc(out.num_rows, tags)
        histogram("fm_label_latency_s", "FM group label() latency", ("group",)).observe(
            time.perf_counter() - started, {"group": self.cfg.name}
        )
        return out

    async def switch(self, version: str | None = None) -> GroupStatus:
        """Switch every gang to `version` (default: the registry's current one)."""
        meta = self._resolve(version)
        ready = [g for g in self.gangs if g.status == "ready"]
        self.version = meta  # gangs rebuilt from now on start from it
        results = await asyncio.gather(*(g.switch(meta) for g in ready), return_exceptions=True)
        for gang, res in zip(ready, results, strict=True):
            if isinstance(res, Exception):
                self._rebuild_soon(gang)
        self._publish_version_gauge()
        LOG.info("FM group %s switched to %s (watermark %s)", self.cfg.name, meta.version, meta.watermark)
        return self.status()

    def _publish_version_gauge(self) -> None:
        if self.version is not None:
            gauge("fm_version_watermark", "Data watermark (unix s) of the FM version served", ("group", "version")).set(
                self.version.watermark, {"group": self.cfg.name, "version": self.version.version}
            )

    def status(self) -> GroupStatus:
        return GroupStatus(
            name=self.cfg.name,
            version=self.version,
            ready=any(g.status == "ready" for g in self.gangs),
            gangs=[g.describe() for g in self.gangs],
            num_shards=self.cfg.num_shards,
            rows_labeled=self.rows_labeled,
            calls=self.calls,
            failed_calls=self.failed_calls,
            uptime_s=round(time.time() - self.started_at, 1),
        )

    def rank_handles(self, gang: int = 0) -> list:
        """The rank actors of a gang (operations and fault-injection tests)."""
        return list(self.gangs[gang].ranks)

    async def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for g in self.gangs:
            g.kill()
            g.status = "stopped"
            if g.pg is not None:
                remove_placement_group(g.pg)

    def _resolve(self, version: str | None) -> FMVersion:
        meta = self.registry.get(version) if version else self.registry.current()
        if meta is None:
            raise ConfigError(f"no FM version published in {self.registry.root}; train or publish one first")
        return meta

    def _pick(self) -> Gang:
        ready = [g for g in self.gangs if g.status == "ready"]
        if not ready:
            states = ", ".join(f"gang {g.index}: {g.status}" for g in self.gangs)
            raise FMUnavailable(f"no FM gang is ready ({states}); retry shortly")
        start = next(self._next)
        return min(ready, key=lambda g: (g.in_flight, (g.index - start) % len(self.gangs)))

    def _rebuild_soon(self, gang: Gang) -> None:
        if gang.index not in self._rebuilding:
            self._rebuilding.add(gang.index)
            asyncio.get_running_loop().create_task(self._rebuild(gang))

    async def _rebuild(self, gang: Gang) -> None:
        try:
            gang.status = "rebuilding"
            gang.kill()
            for attempt in range(5):
                try:
                    assert self.version is not None
                    await gang.start(self.version)
                    gang.rebuilds += 1
                    return
                except Exception as exc:  # a failed start leaves no usable ranks: clean up, back off, retry
                    gang.error = f"rebuild attempt {attempt + 1}: {type(exc).__name__}: {exc}"[:300]
                    gang.kill()
                    await asyncio.sleep(min(2**attempt, 10))
            gang.status = "failed"
        finally:
            self._rebuilding.discard(gang.index)


async def _all(refs: list, timeout: float) -> list:
    """Await every ref; the first failure (or the timeout) raises at once instead of waiting on the rest."""

    async def one(ref):
        return await ref

    tasks = [asyncio.ensure_future(one(r)) for r in refs]
    done, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(refs)} ranks did not answer within {timeout} s")
    return [t.result() for t in tasks]


def _empty(cols: int):
    import numpy as np

    return np.zeros((0, cols), np.float32)
