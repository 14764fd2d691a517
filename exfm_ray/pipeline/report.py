"""The report of one `exfm run`: what the students gained from the FM, and what the system did.

- NE/AUC per tenant and window of the ExFM student vs the same student trained without the FM
  (its control), and of the FM itself on the tenant's rows;
- FM calls per tenant row (the DAS labels each example once however many tenants log it);
- FM staleness per window: the window's start minus the data watermark of the FM that labeled it;
- stage timings per window, and serving latency and parity through HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from exfm_ray.files import json_safe  # noqa: E402
from exfm_ray.metrics import transfer_ratio  # noqa: E402
from exfm_ray.numbers import finite, fmt  # noqa: E402
from exfm_ray.tenants.report import plot as plot_tenants  # noqa: E402
from exfm_ray.tenants.report import served_counts, summarize, young_fm_lines  # noqa: E402


def staleness_hours(event_time, watermark) -> tuple[float | None, float | None]:
    """Mean and 90th percentile over labeled rows of event time - FM data watermark, in hours
    (how old the FM's knowledge is when the row happens)."""
    import numpy as np

    t = np.asarray(event_time, dtype=float)
    w = np.asarray(watermark, dtype=float)  # NaN where the row has no FM label
    age = (t - w)[~np.isnan(w)] / 3600
    if age.size == 0:
        return None, None
    return float(age.mean()), float(np.percentile(age, 90))


def system_rows(records: dict, staleness: dict[int, tuple], timings: dict) -> list[dict]:
    """One row per committed window: rows, FM calls, amortization, masked rows, staleness, stage times."""
    rows = []
    for t in sorted(records):
        r = records[t]
        stale, stale_p90 = staleness.get(t, (None, None))
        rows.append(
            {
                "window": t,
                "tenant_rows": r.input_rows,
                "fm_calls": r.fm_calls,
                "fm_calls_per_row": r.amortization,
                "masked_rows": r.masked_rows,
                "fm_versions": r.fm_versions,
                "staleness_h": stale,
                "staleness_p90_h": stale_p90,
                **{f"{k}_s": v for k, v in timings.get(t, {}).items()},
            }
        )
    return rows


def overall(summary: dict[str, dict]) -> dict:
    """Mean over tenants of each tenant's mean after warm-up."""
    keys = ("ne_mean", "control_ne_mean", "served_ne_mean", "base_rate_ne_mean", "fm_ne_mean", "auc_mean")
    out = {}
    for k in keys:
        vals = [s[k] for s in summary.values() if finite(s.get(k))]
        out[k] = sum(vals) / len(vals) if vals else None
    tr = None
    if all(finite(out[k]) for k in ("ne_mean", "control_ne_mean", "fm_ne_mean")):
        tr = transfer_ratio(out["control_ne_mean"], out["ne_mean"], out["fm_ne_mean"])
    out["transfer_ratio"] = tr if finite(tr) else None
    served: dict[str, int] = {}
    for s in summary.values():
        for c, n in (s.get("served") or {}).items():
            served[c] = served.get(c, 0) + n
    out["served"] = served
    return out


def build(histories: dict[str, list[dict]], system: list[dict], serving: dict, warmup: int, meta: dict) -> dict:
    summary = summarize(histories, warmup)
    return {
        **meta,
        "warmup": warmup,
        "tenants": summary,
        "all_tenants": overall(summary),
        "system": system,
        "serving": serving,
        "windows": histories,
    }


def markdown(report: dict) -> str:
    w = report["warmup"]
    lines = [
        f"# exfm run {report.get('run_id', '')}",
        "",
        f"Stream `{report.get('stream', '?')}`, {report.get('num_windows', '?')} windows, FM delay "
        f"{report.get('fm_delay', '?')}, tenants {', '.join(sorted(report['tenants']))}. Averages leave out the "
        f"first {w} windows (no FM label yet, then the FM's first one).",
        "",
        "## Students: ExFM vs the same student alone, and what the guard served (NE, lower is better)",
        "",
        "The guard serves, after each window, whichever of the ExFM student, the student alone, their "
        "blend (mean probability) and the constant base rate had the lowest NE over the trailing windows. "
        "TR = transfer ratio: the share of "
        "the FM's gain over the student alone that the ExFM student captures.",
        "",
        "| tenant | NE ExFM | NE alone | change | NE served | served windows | FM NE | TR | AUC ExFM |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    rows = [*sorted(report["tenants"].items()), ("all tenants", report["all_tenants"])]
    for name, s in rows:
        ne, alone = s["ne_mean"], s["control_ne_mean"]
        change = f"{100 * (ne - alone) / alone:+.2f}%" if finite(ne) and finite(alone) else "n/a"
        lines.append(
            f"| {name} | {fmt(ne)} | {fmt(alone)} | {change} | {fmt(s.get('served_ne_mean'))} | "
            f"{served_counts(s.get('served') or {})} | {fmt(s['fm_ne_mean'])} | {fmt(s.get('transfer_ratio'), '.2f')} "
            f"| {fmt(s['auc_mean'])} |"
        )
    lines += young_fm_lines(report["tenants"])
    lines += ["", "Per window (`ne_per_window.png`), NE of ExFM / alone / FM, and the model served:", "",
              "| window | " + " | ".join(sorted(report["windows"])) + " |"]  # fmt: skip
    lines.append("|---:|" + "---|" * len(report["windows"]))
    windows = sorted({r["window"] for h in report["windows"].values() for r in h})
    for t in windows:
        cells = []
        for tenant in sorted(report["windows"]):
            r = next((x for x in report["windows"][tenant] if x["window"] == t), {})
            served = f", served {r['served']}" if r.get("served") else ""
            cells.append(f"{fmt(r.get('ne'))} / {fmt(r.get('control_ne'))} / {fmt(r.get('fm_ne'))}{served}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## System (`system.png`)",
        "",
        "| window | tenant rows | FM calls | calls per row | masked rows | FM staleness (h) mean / p90 | stages (s) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["system"]:
        stages = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r.items() if k.endswith("_s") and finite(v))
        stale = f"{fmt(r['staleness_h'], '.1f')} / {fmt(r['staleness_p90_h'], '.1f')}"
        lines.append(
            f"| {r['window']} | {r['tenant_rows']} | {r['fm_calls']} | {r['fm_calls_per_row']:.3f} | "
            f"{r['masked_rows']} | {stale} | {stages} |"
        )
    serving = report.get("serving") or {}
    if serving:
        lines += [
            "",
            f"## Serving (Ray Serve at {serving.get('url', '?')})",
            "",
            "| tenant | version | p50 ms | p99 ms | max abs diff vs in-process |",
            "|---|---|---:|---:|---:|",
        ]
        for tenant, s in sorted(serving.get("tenants", {}).items()):
            lines.append(
                f"| {tenant} | {s['version']} | {fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} | "
                f"{fmt(s['max_abs_diff'], '.2e')} |"
            )
    return "\n".join(lines) + "\n"


def plot_system(system: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ws = [r["window"] for r in system]
    axes[0].bar(ws, [r["fm_calls_per_row"] for r in system], color="tab:blue")
    axes[0].set_title("FM calls per tenant row")
    axes[0].set_ylim(0, 1.05)
    stale = [(r["window"], r["staleness_h"]) for r in system if finite(r["staleness_h"])]
    axes[1].plot([w for w, _ in stale], [s for _, s in stale], marker="o")
    axes[1].set_title("FM staleness (h): row time - FM watermark")
    stages = sorted({k for r in system for k in r if k.endswith("_s")})
    bottom = [0.0] * len(system)
    for stage in stages:
        vals = [r.get(stage) or 0.0 for r in system]
        axes[2].bar(ws, vals, bottom=bottom, label=stage[:-2])
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    axes[2].set_title("stage time per window (s)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("window")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "json": out_dir / "report.json",
        "ne_plot": out_dir / "ne_per_window.png",
        "system_plot": out_dir / "system.png",
    }
    paths["json"].write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(report))
    plot_tenants(report["windows"], paths["ne_plot"], title="NE per window: ExFM student, student alone, FM")
    plot_system(report["system"], paths["system_plot"])
    return paths
