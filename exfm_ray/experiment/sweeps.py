"""The method's evidence as sweeps anyone can rerun: `exfm experiment --sweep NAME`.

- delay: FM delay 0 (a leaky oracle, flagged), 1, 2, 4 windows; each distilled variant with and
  without its Student Adapter, so the table shows what staleness costs and what the adapter wins back.
- fm_bias: a logit offset on the FM's labels of the first tenant (the FM systematically wrong on it),
  0 to 2; scored on that tenant: auxiliary head vs single-head KD vs the default.
- fm_size: four FM sizes; FM NE, student NE and the transfer ratio (share of the FM's gain over the
  student alone that the student captures).
- knobs: a w x beta x alpha grid of the ExFM aux-head variant, in one experiment (FM labels shared).

Each point is one experiment (`run_experiment`) on the same stream; the sweep writes sweep.json,
sweep.md and sweep.png.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402

from exfm_ray.data.stream import Stream  # noqa: E402
from exfm_ray.errors import ConfigError  # noqa: E402
from exfm_ray.experiment.config import SWEEPS, ExperimentConfig  # noqa: E402
from exfm_ray.experiment.report import summarize, variants_of  # noqa: E402
from exfm_ray.experiment.runner import run_experiment  # noqa: E402
from exfm_ray.files import json_safe  # noqa: E402
from exfm_ray.numbers import fmt  # noqa: E402
from exfm_ray.students.config import DEFAULT_VARIANT  # noqa: E402

Point = tuple[str, ExperimentConfig]


def _uniq(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def delay_points(cfg: ExperimentConfig) -> list[Point]:
    variants = _uniq(["vm_only", "kd_single_head", "kd_sa", "ah", "ah_sa", DEFAULT_VARIANT])
    return [(f"delay {d}", cfg.replace(fm_delay=d, variants=variants, warmup=5)) for d in (0, 1, 2, 4)]


def fm_bias_points(cfg: ExperimentConfig, tenant: str) -> list[Point]:
    variants = _uniq(["vm_only", "kd_single_head", "kd_sa", "ah", "ah_sa", DEFAULT_VARIANT])
    return [(f"bias {b:+g}", cfg.replace(fm_bias={tenant: b}, variants=variants)) for b in (0.0, 0.5, 1.0, 2.0)]


def fm_size_points(cfg: ExperimentConfig) -> list[Point]:
    variants = _uniq(["vm_only", "kd_single_head", "ah_sa", DEFAULT_VARIANT])
    return [(f"FM size {s}", cfg.replace(fm=cfg.fm.replace(size=s), variants=variants)) for s in (1, 2, 3, 5)]


KNOB_GRID = {"w": (0.5, 1.0, 2.0), "beta": (0.5, 1.0, 2.0), "alpha": (1.0, 2.0)}


def knob_points(cfg: ExperimentConfig) -> list[Point]:
    arms = [
        "ah_sa@" + ",".join(f"{k}={v:g}" for k, v in zip(KNOB_GRID, values, strict=True))
        for values in itertools.product(*KNOB_GRID.values())
    ]
    kd = [f"kd_sa@w={w:g}" for w in KNOB_GRID["w"]]  # beta and alpha have no effect without an aux head
    return [("knobs", cfg.replace(variants=_uniq(["vm_only", "kd_single_head", DEFAULT_VARIANT, *kd, *arms])))]


def sweep_points(name: str, cfg: ExperimentConfig, stream: Stream) -> list[Point]:
    if name == "delay":
        return delay_points(cfg)
    if name == "fm_bias":
        return fm_bias_points(cfg, stream.spec.tenant_names[0])
    if name == "fm_size":
        return fm_size_points(cfg)
    if name == "knobs":
        return knob_points(cfg)
    raise ConfigError(f"unknown sweep {name!r}; choose from {list(SWEEPS)}")


def run_sweep(
    name: str, cfg: ExperimentConfig, stream: Stream, progress: Callable[[int, str], None] | None = None
) -> dict:
    """Every point of the sweep on `stream`; rows of (point, variant) with NE, change vs vm_only,
    transfer ratio, worst window, and for fm_bias the biased tenant's own NE."""
    rows = []
    for label, point in sweep_points(name, cfg, stream):
        records = run_experiment(point, stream, progress)
        summary = variants_of(summarize(records, point.warmup_windows)["summary"])
        per_tenant = summarize(records, point.warmup_windows)["per_tenant"]
        for variant, s in summary.items():
            row = {
                "point": label,
                "variant": variant,
                "ne_mean": s["ne_mean"],
                "ne_std": s["ne_std"],
                "ne_change_vs_vm_only_pct": s.get("ne_change_vs_vm_only_pct"),
                "transfer_ratio": s.get("transfer_ratio"),
                "worst_window_vs_vm_only_pct": s.get("worst_window_vs_vm_only_pct"),
                "calibration_mean": s["calibration_mean"],
            }
            if point.fm_bias:
                tenant = next(iter(point.fm_bias))
                cell = per_tenant.get(variant, {}).get(tenant, {})
                row.update(biased_tenant=tenant, biased_tenant_ne=cell.get("ne_mean"))
            rows.append(row)
    return {"sweep": name, "dataset": stream.spec.name, "seeds": cfg.seeds, "leaky_points": ["delay 0"]
            if name == "delay" else [], "default_variant": DEFAULT_VARIANT, "rows": rows}  # fmt: skip


def markdown(result: dict) -> str:
    bias = any("biased_tenant" in r for r in result["rows"])
    head = "| point | variant | NE mean | NE std | vs vm_only | worst window | TR | calibration |"
    if bias:
        head += " NE of the biased tenant |"
    lines = [
        f"## Sweep `{result['sweep']}` on {result['dataset']} ({result['seeds']} seeds; default variant "
        f"`{result['default_variant']}`)",
        "",
        head,
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if bias else ""),
    ]
    for r in result["rows"]:
        line = (
            f"| {r['point']} | {r['variant']} | {fmt(r['ne_mean'])} | {fmt(r['ne_std'])} | "
            f"{fmt(r['ne_change_vs_vm_only_pct'], '+.2f')}% | {fmt(r['worst_window_vs_vm_only_pct'], '+.2f')}% | "
            f"{fmt(r['transfer_ratio'], '.2f')} | {fmt(r['calibration_mean'], '.3f')} |"
        )
        lines.append(line + (f" {fmt(r.get('biased_tenant_ne'))} |" if bias else ""))
    if result["leaky_points"]:
        lines += ["", f"**{', '.join(result['leaky_points'])}: leaky oracle (the FM trained on the window it "
                  "labels): a diagnostic, never a result.**"]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    rows = result["rows"]
    points = _uniq([r["point"] for r in rows])
    variants = _uniq([r["variant"] for r in rows])
    key = "biased_tenant_ne" if any("biased_tenant" in r for r in rows) else "ne_mean"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(points) + 4), 4.2))
    if len(points) == 1:  # one experiment (the knob grid): a bar per arm
        vals = [next(r[key] for r in rows if r["variant"] == v) for v in variants]
        ax.barh(range(len(variants)), vals, color="tab:blue")
        ax.set_yticks(range(len(variants)), variants, fontsize=7)
        ax.set_xlim(min(v for v in vals if v is not None) * 0.995, max(v for v in vals if v is not None) * 1.002)
        ax.set_xlabel("NE after warm-up (lower is better)")
    else:
        for v in variants:
            pts = [(points.index(r["point"]), r[key]) for r in rows if r["variant"] == v and r[key] is not None]
            style = {"linestyle": "--", "color": "black"} if v == "fm" else {"marker": "o"}
            ax.plot([p for p, _ in pts], [y for _, y in pts], label=v, **style)
        ax.set_xticks(range(len(points)), points)
        ax.set_ylabel("NE of the biased tenant" if key == "biased_tenant_ne" else "NE after warm-up")
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep {result['sweep']} on {result['dataset']}, {result['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweep(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "sweep.json", "markdown": out_dir / "sweep.md", "plot": out_dir / "sweep.png"}
    paths["json"].write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
