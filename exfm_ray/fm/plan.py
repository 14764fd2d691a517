"""Plan the sharding of a huge FM on a GPU cluster that does not exist yet, from a CPU machine.

`plan_fm(spec)` lays out embedding tables that add up to `spec.fm_params` parameters (or takes the
tables the user lists), builds the real `FoundationModel` on the `meta` device (no memory is
allocated, so 1e12 parameters are fine on a laptop), and runs TorchRec's `EmbeddingShardingPlanner`
on a simulated topology (`TopologyFactory`, dry run): `gpus` ranks of `hbm_gb` HBM each, `ddr_gb`
host memory per rank for UVM, `ssd_gb` SSD per rank for key-value tables. It returns a
`PlanReport`: per-rank memory, the sharding type and kernel of every table, and whether the plan
fits. A plan that does not fit is a result
(`fits=False` with the planner's reason), not an exception.

What is counted, per rank, in `per_rank_hbm_gb` (the planner's own storage estimate of each shard):
  - embedding weights, fp32 (4 bytes per value);
  - optimizer state of the tables: row-wise Adagrad (the default, what the FM trains with) keeps
    1 fp32 per row, i.e. weights x (1 + 1/dim); `adagrad` 1 value per weight (x2), `adam` 2 (x3),
    `sgd` none. It is declared to the planner with `apply_optimizer_in_backward`, the way TorchRec
    reads it;
  - the shard's input (KJT ids) and output (pooled embeddings) buffers for `batch_size` samples
    per rank and one id per feature and sample (TorchRec's default pooling factor);
  - for `fused_uvm_caching` tables: the HBM cache (20% of the shard's rows, TorchRec's default
    load factor) plus its bookkeeping; the full shard then sits in `per_rank_ddr_gb`.
Not in it: `reserve_fraction` of every GPU's HBM is set aside before planning
(`FixedPercentageStorageReservation`) for what is not sharded: the FM's dense layers (data-parallel,
tiny next to the tables: `dense_params`), their gradients and Adam state, activations, NCCL buffers
and the CUDA context. So a plan fits when every rank's shards fit in `hbm_gb * (1 - reserve_fraction)`.

GB means GiB (2**30 bytes) everywhere, inputs included, as in TorchRec's planner output.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torchrec.optim as trec_optim
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import GUARDED_COMPUTE_KERNELS
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from exfm_ray.configbase import Config
from exfm_ray.errors import ConfigError
from exfm_ray.fm.model import FMConfig, FoundationModel, count_parameters
from exfm_ray.fm.plan_tables import TableSpec, fm_table_layout
from exfm_ray.fm.planner_hooks import DATA_PARALLEL_NOISE, CaptureStats, drop_root_warnings

GiB = 2**30
BYTES_PER_VALUE = 4  # fp32 tables, as the EBC builds them
NUM_DENSE_FEATURES = 13  # dense inputs of the planned FM (Criteo-like); only sizes its tiny dense projection
# The planner warns on the root logger for every data-parallel table ("no sharding spec"): expected, not news.
OPTIMIZER_STATE_PER_WEIGHT = {"rowwise_adagrad": None, "adagrad": 1.0, "adam": 2.0, "sgd": 0.0}  # None: 1/dim


class PlanSpec(Config):
    """What to plan: the model (fm_params or tables) and the simulated cluster."""

    fm_params: float | None = Field(
        None, ge=1e6, description="Target parameter count of the FM (e.g. 1e12); the tables are laid out to reach it."
    )
    tables: list[TableSpec] | None = Field(
        None, min_length=1, description="Explicit tables instead of fm_params (one feature per table)."
    )
    gpus: int = Field(ge=1, description="Number of GPUs (ranks, world size) in the simulated cluster.")
    local_world_size: int = Field(8, ge=1, validate_default=True, description="GPUs per host.")
    hbm_gb: float = Field(gt=0, description="HBM per GPU, GiB.")
    ddr_gb: float = Field(
        0, ge=0, description="Host memory per GPU (rank) usable for UVM tables, GiB; 0 = tables must fit in HBM."
    )
    ssd_gb: float = Field(
        0, ge=0, description="SSD per GPU (rank) for key-value tables (FBGEMM SSD kernel), GiB; 0 = no SSD tier."
    )
    embedding_dim: int = Field(128, gt=0, multiple_of=4, description="Embedding dim of the laid-out tables.")
    num_tables: int = Field(26, ge=1, description="Number of laid-out tables (one sparse feature each).")
    num_large_tables: int = Field(
        4, ge=1, validate_default=True, description="Very large id tables (user, ad, ...) among num_tables."
    )
    large_share: float = Field(
        0.9, gt=0, le=1, description="Share of the embedding parameters held by the large tables."
    )
    batch_size: int = Field(4096, ge=1, description="Training batch size per rank (sizes the planner's I/O buffers).")
    compute_device: Literal["cuda", "cpu"] = Field("cuda", description="Device kind of the simulated ranks.")
    reserve_fraction: float = Field(
        0.15, ge=0, lt=1, description="Share of each GPU's HBM kept for the dense part, activations and buffers."
    )
    optimizer: Literal["rowwise_adagrad", "adagrad", "adam", "sgd"] = Field(
        "rowwise_adagrad", description="Embedding optimizer, whose state the planner counts."
    )
    timeout_s: int | None = Field(
        30,
        gt=0,
        description="Stop the planner's search after this long and keep the best plan so far (None: no limit).",
    )

    @field_validator("tables")
    @classmethod
    def _unique_names(cls, tables: list[TableSpec] | None) -> list[TableSpec] | None:
        dupes = sorted(n for n, c in Counter(t.name for t in tables or []).items() if c > 1)
        if dupes:
            raise ValueError(f"duplicate table names {dupes}")
        return tables

    @field_validator("local_world_size")
    @classmethod
    def _whole_hosts(cls, local: int, info: ValidationInfo) -> int:
        gpus = info.data.get("gpus")
        if gpus is not None and gpus > local and gpus % local:
            raise ValueError(f"gpus ({gpus}) must be a multiple of local_world_size ({local})")
        return local

    @field_validator("num_large_tables")
    @classmethod
    def _large_among_all(cls, large: int, info: ValidationInfo) -> int:
        total = info.data.get("num_tables")
        if total is not None and large > total:
            raise ValueError(f"more large tables ({large}) than num_tables ({total})")
        return large

    @model_validator(mode="after")
    def _one_model(self) -> PlanSpec:
        if (self.fm_params is None) == (self.tables is None):
            raise ValueError("give either fm_params or tables (not both, not neither)")
        return self


@dataclass
class TablePlan:
    name: str
    rows: int
    dim: int
    sharding_type: str | None = None
    compute_kernel: str | None = None
    shards: int = 0
    hbm_gb: float = 0.0
    ddr_gb: float = 0.0
    ssd_gb: float = 0.0

    @property
    def params(self) -> int:
        return self.rows * self.dim


@dataclass
class PlanReport:
    fits: bool
    reason: str | None  # the planner's message when fits is False
    timed_out: bool  # the search hit spec.timeout_s: a plan is the best found so far, a failure is not a proof
    module: str  # what the planner saw: "FoundationModel" or "EmbeddingBagCollection"
    total_params: int
    embedding_params: int
    dense_params: int
    gpus: int
    hosts: int
    local_world_size: int
    hbm_gb: float
    ddr_gb: float
    ssd_gb: float
    reserve_fraction: float
    hbm_budget_gb: float  # per rank, for embedding shards: hbm_gb * (1 - reserve_fraction)
    batch_size: int
    optimizer: str
    compute_device: str
    weights_gb: float  # all tables, fp32
    optimizer_state_gb: float  # all tables
    cluster_budget_gb: float  # gpus * (hbm_budget_gb + ddr_gb + ssd_gb)
    gpus_needed: int  # the fewest GPUs of this kind whose memory holds weights + optimizer state
    per_rank_hbm_gb: list[float]  # empty when the plan does not fit
    per_rank_ddr_gb: list[float]
    per_rank_ssd_gb: list[float]
    max_rank_hbm_gb: float | None
    median_rank_hbm_gb: float | None
    min_rank_hbm_gb: float | None
    max_rank_ddr_gb: float | None
    max_rank_ssd_gb: float | None
    sharding_types: dict[str, str]  # table -> sharding type
    sharding_type_counts: dict[str, int]
    compute_kernels: dict[str, str]  # table -> compute kernel
    compute_kernel_counts: dict[str, int]
    num_shards: int
    num_proposals: int
    num_plans: int
    planning_seconds: float  # EmbeddingShardingPlanner.plan
    seconds: float  # everything: layout, meta model, planning
    tables: list[TablePlan] = field(default_factory=list)

    def busiest_ranks(self, n: int = 3) -> list[tuple[int, float]]:
        ranked = sorted(enumerate(self.per_rank_hbm_gb), key=lambda rh: -rh[1])
        return ranked[:n]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_fm(spec: PlanSpec) -> PlanReport:
    """Run TorchRec's planner for `spec` on a simulated topology. Never raises for a plan that does not fit."""
    start = time.perf_counter()
    model, table_specs = _meta_model(spec)
    ebc = model.ebc if isinstance(model, FoundationModel) else model
    apply_optimizer_in_backward(_optimizer_class(spec.optimizer), ebc.parameters(), {"lr": 0.01})
    embedding_params = count_parameters(ebc)
    dense_params = count_parameters(model) - embedding_params
    capture, fits, reason, planning_seconds = _run_planner(spec, model)
    tables, hbm, ddr, ssd = _placements(spec, table_specs, capture if fits else None)

    weight_bytes = sum(t.params for t in tables) * BYTES_PER_VALUE
    opt_bytes = sum(t.params * _state_per_weight(spec.optimizer, t.dim) for t in tables) * BYTES_PER_VALUE
    budget = spec.hbm_gb * (1 - spec.reserve_fraction)
    per_gpu = budget + spec.ddr_gb + spec.ssd_gb
    planned = [t for t in tables if t.sharding_type]
    return PlanReport(
        fits=fits,
        reason=reason,
        timed_out=spec.timeout_s is not None and planning_seconds > spec.timeout_s,
        module=type(model).__name__,
        total_params=embedding_params + dense_params,
        embedding_params=embedding_params,
        dense_params=dense_params,
        gpus=spec.gpus,
        hosts=max(1, spec.gpus // spec.local_world_size),
        local_world_size=min(spec.local_world_size, spec.gpus),
        hbm_gb=spec.hbm_gb,
        ddr_gb=spec.ddr_gb,
        ssd_gb=spec.ssd_gb,
        reserve_fraction=spec.reserve_fraction,
        hbm_budget_gb=round(budget, 3),
        batch_size=spec.batch_size,
        optimizer=spec.optimizer,
        compute_device=spec.compute_device,
        weights_gb=round(weight_bytes / GiB, 3),
        optimizer_state_gb=round(opt_bytes / GiB, 3),
        cluster_budget_gb=round(spec.gpus * per_gpu, 3),
        gpus_needed=math.ceil((weight_bytes + opt_bytes) / GiB / per_gpu),
        per_rank_hbm_gb=[round(x, 3) for x in hbm] if fits else [],
        per_rank_ddr_gb=[round(x, 3) for x in ddr] if fits else [],
        per_rank_ssd_gb=[round(x, 3) for x in ssd] if fits else [],
        max_rank_hbm_gb=round(max(hbm), 3) if fits else None,
        median_rank_hbm_gb=round(statistics.median(hbm), 3) if fits else None,
        min_rank_hbm_gb=round(min(hbm), 3) if fits else None,
        max_rank_ddr_gb=round(max(ddr), 3) if fits else None,
        max_rank_ssd_gb=round(max(ssd), 3) if fits else None,
        sharding_types={t.name: t.sharding_type for t in planned},
        sharding_type_counts=dict(sorted(Counter(t.sharding_type for t in planned).items())),
        compute_kernels={t.name: t.compute_kernel for t in planned},
        compute_kernel_counts=dict(sorted(Counter(t.compute_kernel for t in planned).items())),
        num_shards=sum(t.shards for t in planned),
        num_proposals=capture.num_proposals,
        num_plans=capture.num_plans,
        planning_seconds=round(planning_seconds, 2),
        seconds=round(time.perf_counter() - start, 2),
        tables=tables,
    )


def _meta_model(spec: PlanSpec) -> tuple[torch.nn.Module, list[TableSpec]]:
    """The model to plan, on the meta device, and its tables (laid out to reach fm_params if asked)."""
    meta = torch.device("meta")

    def ebc_configs(tables: list[TableSpec]) -> list[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(
                name=f"t_{t.name}",
                embedding_dim=t.dim or spec.embedding_dim,
                num_embeddings=t.rows,
                feature_names=[t.name],
            )
            for t in tables
        ]

    def build(tables: list[TableSpec]) -> torch.nn.Module:
        dims = {t.dim or spec.embedding_dim for t in tables}
        if len(dims) > 1:  # the FM concatenates equal-dim vectors; mixed dims can only be planned as a bare EBC
            return EmbeddingBagCollection(tables=ebc_configs(tables), device=meta)
        cfg = FMConfig(embedding_dim=dims.pop())
        return FoundationModel(ebc_configs(tables), NUM_DENSE_FEATURES, ["tenant"], cfg, device=meta)

    if spec.tables is not None:
        return build(list(spec.tables)), list(spec.tables)
    # The dense part depends on the number of tables and the dim only: size it on 1-row tables.
    stub = [TableSpec(name=t.name, rows=1, dim=t.dim) for t in fm_table_layout(spec, spec.num_tables)]
    dense = count_parameters(build(stub)) - sum(t.dim for t in stub)
    target = int(spec.fm_params) - dense
    if target < spec.num_tables * spec.embedding_dim:
        raise ConfigError(f"field 'fm_params': {spec.fm_params:.3g} is smaller than the FM's dense part ({dense})")
    table_specs = fm_table_layout(spec, target)
    return build(table_specs), table_specs


def _run_planner(spec: PlanSpec, model: torch.nn.Module) -> tuple[CaptureStats, bool, str | None, float]:
    """TorchRec's planner on the simulated topology: (its captured stats, fits, why not, seconds)."""
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=spec.gpus, local_world_size=min(spec.local_world_size, spec.gpus), is_dry_run=True
        ),
        hardware_config=HardwareConfig(
            hbm_cap_bytes=int(spec.hbm_gb * GiB),
            ddr_cap_bytes=int(spec.ddr_gb * GiB),
            ssd_cap_bytes=int(spec.ssd_gb * GiB),
        ),
        kernel_config=KernelConfig(compute_device=spec.compute_device),
    )
    capture = CaptureStats()
    constraints = None
    if spec.ssd_gb:  # TorchRec offers its SSD-backed kernel only to tables that name it
        kernels = [k.value for k in EmbeddingComputeKernel if k not in GUARDED_COMPUTE_KERNELS]
        kernels.append(EmbeddingComputeKernel.KEY_VALUE.value)
        ebc = model.ebc if isinstance(model, FoundationModel) else model
        constraints = {c.name: ParameterConstraints(compute_kernels=kernels) for c in ebc.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        batch_size=spec.batch_size,
        storage_reservation=FixedPercentageStorageReservation(spec.reserve_fraction),
        stats=capture,
        debug=False,
        timeout_seconds=spec.timeout_s,
    )
    reason = None
    began = time.perf_counter()
    try:
        with drop_root_warnings(DATA_PARALLEL_NOISE):
            planner.plan(model, [EmbeddingBagCollectionSharder()])
        fits = True
    except PlannerError as exc:
        fits, reason = False, str(exc).strip()
    return capture, fits, reason, time.perf_counter() - began


def _placements(
    spec: PlanSpec, table_specs: list[TableSpec], capture: CaptureStats | None
) -> tuple[list[TablePlan], list[float], list[float], list[float]]:
    """Per table: sharding, kernel, shards and memory; per rank: HBM, DDR and SSD in GB (zeros without a plan)."""
    by_table = {f"t_{t.name}": TablePlan(t.name, t.rows, t.dim or spec.embedding_dim) for t in table_specs}
    hbm = [0.0] * spec.gpus
    ddr = [0.0] * spec.gpus
    ssd = [0.0] * spec.gpus
    for option in capture.best_plan if capture is not None else []:
        table = by_table[option.name]
        table.sharding_type, table.compute_kernel, table.shards = (
            option.sharding_type,
            option.compute_kernel,
            len(option.shards),
        )
        for shard in option.shards:
            assert shard.storage is not None and shard.rank is not None
            hbm[shard.rank] += shard.storage.hbm / GiB
            ddr[shard.rank] += shard.storage.ddr / GiB
            ssd[shard.rank] += shard.storage.ssd / GiB
            table.hbm_gb += shard.storage.hbm / GiB
            table.ddr_gb += shard.storage.ddr / GiB
            table.ssd_gb += shard.storage.ssd / GiB
    tables = list(by_table.values())
    for t in tables:
        t.hbm_gb, t.ddr_gb, t.ssd_gb = round(t.hbm_gb, 3), round(t.ddr_gb, 3), round(t.ssd_gb, 3)
    return tables, hbm, ddr, ssd


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    return {
        "rowwise_adagrad": trec_optim.RowWiseAdagrad,
        "adagrad": trec_optim.Adagrad,
        "adam": trec_optim.Adam,
        "sgd": trec_optim.SGD,
    }[name]


def _state_per_weight(optimizer: str, dim: int) -> float:
    per_weight = OPTIMIZER_STATE_PER_WEIGHT[optimizer]
    return 1 / dim if per_weight is None else per_weight
