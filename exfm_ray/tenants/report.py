"""Per-tenant training results: one JSON of every window's metrics, a Markdown table and a PNG of
NE per window per tenant (with the student trained without the FM and the FM itself, if known)."""

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
from exfm_ray.students.guard import CANDIDATES  # noqa: E402


def summarize(histories: dict[str, list[dict]], warmup: int = 1) -> dict[str, dict]:
    """Per tenant: mean NE/AUC (ExFM student, student alone, FM) over windows >= warmup."""
    out = {}
    for tenant, history in histories.items():
        rows = [r for r in history if r["window"] >= warmup]
        s = {
            "windows": len(history),
            "ne_mean": _mean(r.get("ne") for r in rows),
            "auc_mean": _mean(r.get("auc") for r in rows),
            "control_ne_mean": _mean(r.get("control_ne") for r in rows),
            "blend_ne_mean": _mean(r.get("blend_ne") for r in rows),
            "fm_ne_mean": _mean(r.get("fm_ne") for r in rows),
            "served_ne_mean": _mean(r.get("served_ne") for r in rows),
            "base_rate_ne_mean": _mean(r.get("base_rate_ne") for r in rows),
            "first_ne": history[0].get("ne") if history else None,
            "last_ne": history[-1].get("ne") if history else None,
            "served": {
                c: sum(r.get("served") == c for r in rows)
                for c in CANDIDATES
                if any(r.get("served") == c for r in rows)
            },
            "serving_now": history[-1].get("guard_choice") if history else None,
            # the young FM's verdict (fm_gate_young_z), pooled over tenants on its first labeled window
            "young_fm": next(
                (
                    {k.removeprefix("young_fm_"): r[k] for k in r if k.startswith("young_fm_")}
                    for r in history
                    if "young_fm_on" in r
                ),
                None,
            ),
        }
        tr = None
        if finite(s["control_ne_mean"]) and finite(s["ne_mean"]) and finite(s["fm_ne_mean"]):
            tr = transfer_ratio(s["control_ne_mean"], s["ne_mean"], s["fm_ne_mean"])
        s["transfer_ratio"] = tr if finite(tr) else None
        out[tenant] = s
    return out


def markdown(summary: dict[str, dict], warmup: int) -> str:
    lines = [
        f"NE after warm-up (windows >= {warmup}), lower is better; 'alone' = same student without the FM; "
        "'served' = what the do-no-harm guard served; TR = transfer ratio (share of the FM's gain over the "
        "student alone that the ExFM student captures).",
        "",
        "| tenant | windows | NE (ExFM) | NE (alone) | NE change | NE (served) | served windows | FM NE | TR "
        "| AUC (ExFM) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for tenant, s in sorted(summary.items()):
        ne, alone = s["ne_mean"], s["control_ne_mean"]
        change = f"{100 * (ne - alone) / alone:+.2f}%" if finite(ne) and finite(alone) else "n/a"
        lines.append(
            f"| {tenant} | {s['windows']} | {fmt(ne)} | {fmt(alone)} | {change} | {fmt(s.get('served_ne_mean'))} "
            f"| {served_counts(s.get('served') or {})} | {fmt(s['fm_ne_mean'])} "
            f"| {fmt(s.get('transfer_ratio'), '.2f')} | {fmt(s['auc_mean'])} |"
        )
    return "\n".join([*lines, *young_fm_lines(summary)]) + "\n"


def young_fm_lines(summary: dict[str, dict]) -> list[str]:
    """The young FM's verdict per tenant judged (a blank line first), or nothing."""
    judged = {t: s["young_fm"] for t, s in sorted(summary.items()) if s.get("young_fm")}
    if not judged:
        return []
    cells = ", ".join(
        f"{t} {'on' if v.get('on') else 'off'} (z {fmt(v.get('z'), '+.2f')}, {v.get('tenants')} tenants)"
        for t, v in judged.items()
    )
    return ["", f"Young FM's benefit of the doubt (its ranking against the students', pooled over tenants): {cells}."]


def served_counts(served: dict[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in served.items()) or "-"


def plot(histories: dict[str, list[dict]], path: Path, title: str = "NE per window") -> Path:
    tenants = sorted(histories)
    fig, axes = plt.subplots(1, max(len(tenants), 1), figsize=(4.2 * max(len(tenants), 1), 3.6), squeeze=False)
    for ax, tenant in zip(axes[0], tenants, strict=False):
        h = histories[tenant]
        shown = []
        for key, label, style in (
            ("ne", "ExFM student", {"marker": "."}),
            ("control_ne", "student alone", {"linestyle": "--", "marker": "."}),
            ("fm_ne", "FM", {"linestyle": ":", "color": "black"}),
            ("served_ne", "served (guard)", {"linestyle": "none", "marker": "o", "fillstyle": "none"}),
        ):
            pts = [(r["window"], r[key]) for r in h if finite(r.get(key))]
            if pts:
                ax.plot([w for w, _ in pts], [v for _, v in pts], label=label, **style)
                shown += [v for w, v in pts if w >= 1]
        if shown:  # the untrained first window would squash the scale
            lo, hi = min(shown), max(shown)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_title(tenant)
        ax.set_xlabel("window")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("NE (lower is better)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(histories: dict[str, list[dict]], out_dir: Path, warmup: int = 1) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(histories, warmup)
    paths = {
        "json": out_dir / "tenants.json",
        "markdown": out_dir / "tenants.md",
        "plot": out_dir / "ne_per_window.png",
    }
    payload = {"warmup": warmup, "summary": summary, "windows": histories}
    paths["json"].write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(summary, warmup))
    plot(histories, paths["plot"])
    return paths


def _mean(values) -> float | None:
    xs = [v for v in values if finite(v)]
    return sum(xs) / len(xs) if xs else None


def write_storage_report(storage: Path, out: Path, tenants: list[str]) -> dict:
    from exfm_ray.errors import PipelineFailure
    from exfm_ray.tenants.registry import TenantRegistry

    registry = TenantRegistry(storage)
    histories = {n: registry.history(n) for n in tenants}
    if not any(histories.values()):
        raise PipelineFailure("no tenant trained a window; see the errors above")
    return write_report(histories, out)
