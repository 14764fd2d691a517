"""Turn experiment records into results.json, a Markdown table and a PNG of NE per window."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402

from exfm_ray.experiment.guarded import BASE_RATE, worst_excess  # noqa: E402
from exfm_ray.experiment.headroom import HEADROOM  # noqa: E402
from exfm_ray.experiment.runner import mean_std  # noqa: E402
from exfm_ray.metrics import transfer_ratio  # noqa: E402
from exfm_ray.numbers import fmt  # noqa: E402
from exfm_ray.students.config import DEFAULT_VARIANT  # noqa: E402

BASELINE = "vm_only"
GUARD_SPAN = 3  # the guard's promise is checked over any 3 consecutive windows


def summarize(records: list[dict], warmup: int) -> dict:
    """Per variant (and "fm"): per seed, the mean over tenants and windows >= warmup; then mean/std
    over seeds. Also per tenant, and per window averaged over seeds."""
    per_seed: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    per_tenant: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        if r["window"] >= warmup:
            per_seed[r["variant"]][r["seed"]].append(r)
            per_tenant[r["variant"]][r["tenant"]][r["seed"]].append(r["ne"])
    summary = {}
    for v, seeds in per_seed.items():
        ne_by_seed = [_nanmean([r["ne"] for r in rs]) for rs in seeds.values()]
        auc_by_seed = [_nanmean([r["auc"] for r in rs]) for rs in seeds.values()]
        cal_by_seed = [_nanmean([r["calibration"] for r in rs]) for rs in seeds.values()]
        ne_m, ne_s = mean_std(ne_by_seed)
        auc_m, auc_s = mean_std(auc_by_seed)
        summary[v] = {
            "ne_mean": ne_m,
            "ne_std": ne_s,
            "auc_mean": auc_m,
            "auc_std": auc_s,
            "calibration_mean": mean_std(cal_by_seed)[0],
            "seeds": len(ne_by_seed),
            "ne_by_seed": ne_by_seed,
        }
    tenants = {
        v: {
            t: dict(zip(("ne_mean", "ne_std"), mean_std([_nanmean(x) for x in by_seed.values()]), strict=True))
            for t, by_seed in ts.items()
        }
        for v, ts in per_tenant.items()
    }
    if BASELINE in summary:
        base = summary[BASELINE]["ne_mean"]
        worst = _worst_windows(records, warmup)
        for v, s in summary.items():
            s["ne_change_vs_vm_only_pct"] = 100.0 * (s["ne_mean"] - base) / base
            s.update(worst.get(v, {}))
            if v not in ("fm", BASELINE, BASE_RATE, HEADROOM) and "fm" in summary:
                s["transfer_ratio"] = transfer_ratio(base, s["ne_mean"], summary["fm"]["ne_mean"])
                for t, cell in tenants[v].items():
                    alone, fm = tenants[BASELINE].get(t), tenants["fm"].get(t)
                    if alone and fm:
                        cell["transfer_ratio"] = transfer_ratio(alone["ne_mean"], cell["ne_mean"], fm["ne_mean"])
    summary["default_variant"] = DEFAULT_VARIANT
    return {
        "summary": summary,
        "default_variant": DEFAULT_VARIANT,
        "per_tenant": tenants,
        "per_window": _per_window(records),
        "guard": _guard_summary(records, warmup),
    }


def _machine_line(m: dict | None) -> list[str]:
    if not m:
        return []
    return [
        "",
        f"Machine: torch {m['torch']}, CPU kernels {m['cpu_kernels']}, {m['threads']} threads. The FM's labels "
        "follow the kernels: compare arms within one run.",
    ]


def variants_of(summary: dict) -> dict[str, dict]:
    """The per-variant entries of a summary (it also names the default variant)."""
    return {v: s for v, s in summary.items() if isinstance(s, dict)}


def _worst_windows(records: list[dict], warmup: int) -> dict[str, dict]:
    """Per variant, the worst post-warm-up window against vm_only (%, mean over seeds): of the
    NE averaged over tenants, and of any single tenant."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r["window"] >= warmup and not math.isnan(r["ne"]):
            cells[(r["variant"], r["seed"], r["window"])].append(r["ne"])
            cells[(r["variant"], r["seed"], r["window"], r["tenant"])].append(r["ne"])
    out: dict[str, dict] = {}
    for v in {k[0] for k in cells}:
        for width, name in ((3, "worst_window_vs_vm_only_pct"), (4, "worst_tenant_window_vs_vm_only_pct")):
            rel: dict[tuple, list[float]] = defaultdict(list)
            for key, ne in cells.items():
                if key[0] == v and len(key) == width:
                    base = cells.get((BASELINE, *key[1:]))
                    if base:
                        rel[key[2:]].append(100 * (_nanmean(ne) - _nanmean(base)) / _nanmean(base))
            if rel:
                out.setdefault(v, {})[name] = max(sum(x) / len(x) for x in rel.values())
    return out


def _guard_summary(records: list[dict], warmup: int) -> dict:
    guarded = f"{DEFAULT_VARIANT}+guard"
    served = [r["served"] for r in records if r["variant"] == guarded and r["window"] >= warmup]
    if not served:
        return {}
    return {
        "variant": guarded,
        "trailing_windows_compared": GUARD_SPAN,
        "worst_excess_vs_control_pct": worst_excess(records, guarded, BASELINE, GUARD_SPAN, warmup),
        "served_share": {c: served.count(c) / len(served) for c in sorted(set(served))},
    }


def _per_window(records: list[dict]) -> dict:
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["variant"], r["tenant"], r["window"])].append(r)
    out: dict = defaultdict(lambda: defaultdict(list))
    for (v, t, w), rs in sorted(cells.items()):
        out[v][t].append(
            {
                "window": w,
                "ne": _nanmean([r["ne"] for r in rs]),
                "auc": _nanmean([r["auc"] for r in rs]),
                "calibration": _nanmean([r["calibration"] for r in rs]),
                "rows": rs[0]["rows"],
                "positives": rs[0]["positives"],
            }
        )
    return {v: dict(ts) for v, ts in out.items()}


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def markdown(results: dict) -> str:
    s = variants_of(results["summary"])
    order = _order(s)
    default = results.get("default_variant", DEFAULT_VARIANT)
    lines = [
        f"## {results['dataset']}: NE after warm-up ({results['warmup']} windows), "
        f"{results['seeds']} seeds, FM delay {results['fm_delay']}",
        "",
        f"Default variant: `{default}`. TR = transfer ratio, the share of the FM's gain over vm_only that the "
        "student captures. Worst window = the post-warm-up window (NE averaged over tenants, mean over seeds) "
        "where the variant is furthest above vm_only." + (_HEADROOM_LINE if HEADROOM in s else ""),
        *_machine_line(results.get("machine")),
        "",
        "| variant | NE mean | NE std | NE vs vm_only | worst window | TR | AUC mean | calibration |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in order:
        r = s[v]
        change = r.get("ne_change_vs_vm_only_pct")
        name = f"**{v}** (default)" if v == default else v
        lines.append(
            f"| {name} | {fmt(r['ne_mean'])} | {fmt(r['ne_std'])} | {fmt(change, '+.2f')}% | "
            f"{fmt(r.get('worst_window_vs_vm_only_pct'), '+.2f')}% | {fmt(r.get('transfer_ratio'), '.2f')} | "
            f"{fmt(r['auc_mean'])} | {fmt(r['calibration_mean'], '.3f')} |"
        )
    tenants = sorted({t for v in results["per_tenant"].values() for t in v})
    lines += ["", "Per tenant, NE mean over seeds (TR in brackets):", "", "| variant | " + " | ".join(tenants) + " |"]
    lines.append("|---|" + "---:|" * len(tenants))
    for v in order:
        row = results["per_tenant"].get(v, {})
        lines.append(f"| {v} | " + " | ".join(_tenant_cell(row.get(t)) for t in tenants) + " |")
    guard = results.get("guard") or {}
    if guard:
        share = ", ".join(f"{c} {100 * x:.0f}%" for c, x in guard["served_share"].items())
        lines += [
            "",
            f"Guard (`{guard['variant']}`): served {share} of tenant-windows after warm-up; worst excess over "
            f"vm_only over any {guard['trailing_windows_compared']} consecutive windows "
            f"{fmt(guard['worst_excess_vs_control_pct'], '+.2f')}%.",
        ]
    for store in results.get("loopfm_store", [])[:1]:
        entities = sum(store["entities"].values())
        lines += [
            "",
            f"LoopFM store (seed {store['seed']}, after window {store['window']}): {entities:,} entities "
            f"({', '.join(f'{k} {n:,}' for k, n in store['entities'].items())}), {store['bytes'] / 2**20:.2f} MiB, "
            f"{store['bytes'] / max(entities, 1):.0f} bytes per entity.",
        ]
    verdicts = results.get("young_fm", [])
    for v in sorted({v for x in verdicts for v in x["on"]}):
        on, zs = sum(x["on"][v] for x in verdicts), [x["z"] for x in verdicts]
        lines += [
            "",
            f"Young FM (`{v}`): judged to out-rank the students on its first labeled window in {on} of "
            f"{len(verdicts)} seeds (pooled AUC gap over tenants, z {min(zs):+.2f} to {max(zs):+.2f}).",
        ]
    if results.get("leaky"):
        lines += ["", "**FM delay 0 is a leaky oracle (the FM was trained on the window it labels): diagnostic only.**"]
    return "\n".join(lines) + "\n"


_HEADROOM_LINE = (
    f" `{HEADROOM}` is a reference, not a student: vm_only's score and the FM's label of the row, combined by a "
    "logistic fit on the earlier windows' labels (a gauge of what the FM's labels add, not a bound: where it is not "
    "below vm_only, no such refit of the FM's labels beats the student alone)."
)


def _tenant_cell(cell: dict | None) -> str:
    if not cell:
        return "-"
    tr = cell.get("transfer_ratio")
    return fmt(cell["ne_mean"]) + (f" ({fmt(tr, '.2f')})" if tr is not None and not math.isnan(tr) else "")


def _order(summary: dict) -> list[str]:
    known = ["fm", HEADROOM, BASE_RATE, "vm_only", "kd_single_head", "kd_sa", "ah", "ah_sa"]
    names = [v for v, s in summary.items() if isinstance(s, dict)]
    return [v for v in known if v in names] + sorted(set(names) - set(known))


def plot(results: dict, path: Path) -> Path:
    """Top row: NE per window (all tenants, then each); bottom row: NE change vs vm_only in %."""
    per_window = results["per_window"]
    tenants = sorted({t for v in per_window.values() for t in v})
    cols = len(tenants) + 1
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 6.4), squeeze=False, sharex=True)
    curves = {v: _curves(per_window[v], tenants) for v in _order(per_window)}
    base = curves.get(BASELINE)
    shown = [ne for c in curves.values() for pts in c.values() for w, ne in pts.items() if w >= results["warmup"]]
    for v, c in curves.items():
        style = {"fm": {"linestyle": "--", "color": "black"}, HEADROOM: {"linestyle": ":", "color": "grey"}}.get(v, {})
        for col, key in enumerate(["all", *tenants]):
            pts = c.get(key, {})
            ws = sorted(pts)
            axes[0][col].plot(ws, [pts[w] for w in ws], marker=".", label=v, **style)
            if base is not None and key in base:
                ws = [w for w in ws if w in base[key] and w >= results["warmup"]]
                rel = [100 * (pts[w] - base[key][w]) / base[key][w] for w in ws]
                axes[1][col].plot(ws, rel, marker=".", label=v, **style)
    for col, title in enumerate(["all tenants", *tenants]):
        axes[0][col].set_title(title)
        axes[1][col].set_xlabel("window")
        for row in (0, 1):
            axes[row][col].axvspan(-0.5, results["warmup"] - 0.5, color="grey", alpha=0.15)
            axes[row][col].grid(alpha=0.3)
        if shown:  # the untrained first window would squash the scale
            lo, hi = min(shown), max(shown)
            axes[0][col].set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    axes[0][0].set_ylabel("NE (lower is better)")
    axes[1][0].set_ylabel("NE vs vm_only (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['dataset']}: NE per window, mean over {results['seeds']} seeds (grey: warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curves(per_tenant: dict, tenants: list[str]) -> dict[str, dict[int, float]]:
    """NE by window for each tenant, and "all" = the mean over tenants."""
    out: dict[str, dict[int, float]] = {t: {p["window"]: p["ne"] for p in per_tenant.get(t, [])} for t in tenants}
    windows = sorted({w for c in out.values() for w in c})
    out["all"] = {w: _nanmean([out[t][w] for t in tenants if w in out[t] and out[t][w] is not None]) for w in windows}
    return out


def write_results(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "plot": out_dir / "ne_per_window.png",
    }
    paths["json"].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths
