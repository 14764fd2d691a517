"""`exfm plan`'s human report: a PlanReport as the lines a capacity planner reads (--json has it all)."""

from __future__ import annotations

from collections import Counter

from exfm_ray.fm.plan import PlanReport

TOP_TABLES = 8  # the human output lists the largest tables; --json has them all


def format_report(r: PlanReport) -> str:
    ddr = f", {r.ddr_gb:g} GB DDR per GPU" if r.ddr_gb else ", no DDR (HBM only)"
    ddr += f", {r.ssd_gb:g} GB SSD per GPU" if r.ssd_gb else ""
    dims = sorted({t.dim for t in r.tables})
    lines = [
        f"model: {r.total_params:,} params = {r.embedding_params:,} in {len(r.tables)} embedding tables "
        f"(dim {'/'.join(map(str, dims))}) + {r.dense_params:,} dense; planned as {r.module} on meta",
        f"cluster: {_n(r.gpus, 'GPU')} ({_n(r.hosts, 'host')} x {r.local_world_size}), {r.hbm_gb:g} GB HBM{ddr}; "
        f"{r.reserve_fraction:.0%} HBM reserved -> {r.hbm_budget_gb:g} GB per GPU for embeddings",
        f"accounting: fp32 weights {r.weights_gb:,.2f} GB + {r.optimizer} state {r.optimizer_state_gb:,.2f} GB "
        f"+ I/O buffers for batch {r.batch_size} per rank",
        f"planner: {r.num_proposals} proposals, {r.num_plans} feasible, {r.planning_seconds:.1f} s "
        f"({r.seconds:.1f} s in all)",
    ]
    if r.timed_out:
        lines.append(
            "planner: stopped at its time limit; "
            + ("the plan is the best found so far" if r.fits else "no plan found in time, which is not a proof")
        )
    if not r.fits:
        need = r.weights_gb + r.optimizer_state_gb
        lines += [
            "",
            "fits: NO",
            f"  {(r.reason or '').splitlines()[0].strip()}",
            f"  the tables need {need:,.1f} GB (weights + optimizer state) before I/O buffers; "
            f"the cluster offers {r.cluster_budget_gb:,.1f} GB (HBM after the reservation + DDR + SSD)",
            f"  short by {max(0.0, need - r.cluster_budget_gb):,.1f} GB: about {r.gpus_needed:,} GPUs of this kind "
            "hold it (more if a single table's shards cannot spread)",
            "  try more --gpus, larger --hbm-gb"
            + (", or --ddr-gb N (host memory with an HBM cache: fused_uvm_caching)" if not r.ddr_gb else "")
            + (", or --ssd-gb N (SSD-backed tables: key_value)" if not r.ssd_gb else ""),
            "  (--json has the planner's full message)",
        ]
        return "\n".join(lines)
    lines += [
        "",
        f"fits: yes (busiest GPU {r.max_rank_hbm_gb:.2f} of {r.hbm_budget_gb:g} GB)",
        f"per-GPU HBM for embeddings, GB: min {r.min_rank_hbm_gb:.2f}  median {r.median_rank_hbm_gb:.2f}  "
        f"max {r.max_rank_hbm_gb:.2f}",
        f"busiest GPUs: {_busiest(r.per_rank_hbm_gb)}",
    ]
    if r.ddr_gb:
        lines.append(f"per-GPU DDR (UVM tables), GB: max {r.max_rank_ddr_gb:.2f} of {r.ddr_gb:g}")
    if r.ssd_gb:
        lines.append(f"per-GPU SSD (key-value tables), GB: max {r.max_rank_ssd_gb:.2f} of {r.ssd_gb:g}")
    lines += [
        f"sharding types: {_counts(r.sharding_type_counts)}  ({r.num_shards} shards)",
        f"compute kernels: {_counts(r.compute_kernel_counts)}",
        "",
        f"{'table':<16} {'rows':>15} {'dim':>4}  {'sharding':<18} {'kernel':<18} {'shards':>6} {'HBM GB':>9}"
        + (f" {'DDR GB':>9}" if r.ddr_gb else "")
        + (f" {'SSD GB':>9}" if r.ssd_gb else ""),
    ]
    largest = sorted(r.tables, key=lambda t: -t.params)
    for t in largest[:TOP_TABLES]:
        lines.append(
            f"{t.name:<16} {t.rows:>15,} {t.dim:>4}  {t.sharding_type:<18} {t.compute_kernel:<18} {t.shards:>6} "
            f"{t.hbm_gb:>9.2f}"
            + (f" {t.ddr_gb:>9.2f}" if r.ddr_gb else "")
            + (f" {t.ssd_gb:>9.2f}" if r.ssd_gb else "")
        )
    rest = largest[TOP_TABLES:]
    if rest:
        kinds = Counter(f"{t.sharding_type}/{t.compute_kernel}" for t in rest)
        lines.append(f"... {len(rest)} smaller tables ({sum(t.params for t in rest):,} params): {_counts(dict(kinds))}")
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _busiest(per_rank: list[float], groups: int = 3) -> str:
    """The top `groups` distinct loads with the ranks carrying them, e.g. '37.62 on ranks 0-7; 36.10 on 8-15'."""
    by_load: dict[float, list[int]] = {}
    for rank, gb in enumerate(per_rank):
        by_load.setdefault(round(gb, 2), []).append(rank)
    top = sorted(by_load.items(), key=lambda kv: -kv[0])[:groups]
    return "; ".join(f"{gb:.2f} on rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)}" for gb, ranks in top)


def _ranges(ranks: list[int], most: int = 6) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'; past `most` runs, the rest is counted."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (f",... ({len(ranks)} ranks)" if len(runs) > most else "")
