"""What the do-no-harm guard would have served in an experiment, from its records.

The experiment trains every variant of a seed from the same initial weights on the same batches,
so its `vm_only` student is exactly the ExFM student's control twin, and `blend` (the mean of the
two students' probabilities, recorded by the runner) is the guard's blend. Each window, the
guard's served model is the candidate (ExFM student, blend, control, constant base rate) with the
lowest trailing NE before that window (`students/guard.py`, the rule the tenant trainers apply).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from exfm_ray.metrics import evaluate
from exfm_ray.students.guard import CANDIDATES, LOG_LOSS_KEY, decide, pooled_ne, trailing_base_rate

BASE_RATE = "base_rate"
BLEND = "blend"
CONTROL = "vm_only"


def base_rate_records(records: list[dict], labels: dict[tuple[str, int], np.ndarray], trailing: int) -> list[dict]:
    """Records of the constant predictor: window t gets the positive rate of the trailing windows
    before it (the first window its own rate, where every fresh head starts). One per seed."""
    out = []
    seeds = sorted({r["seed"] for r in records})
    for tenant in sorted({t for t, _ in labels}):
        history: list[dict] = []
        for t in sorted(w for name, w in labels if name == tenant):
            y = labels[(tenant, t)]
            rate = trailing_base_rate(history, trailing)
            rate = (y.sum() + 0.5) / (len(y) + 1) if rate is None else rate
            scores = evaluate(y, np.full(len(y), rate))
            history.append({"window": t, "rows": len(y), "positives": int(y.sum())})
            out += [{"seed": s, "variant": BASE_RATE, "tenant": tenant, "window": t, **scores} for s in seeds]
    return out


def guarded_records(records: list[dict], exfm_variant: str, trailing: int) -> list[dict]:
    """Records of variant `<exfm_variant>+guard`: per window, a copy of the record of the
    candidate the guard served (chosen after the previous window), with `served` naming it."""
    by_key: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        by_key[(r["seed"], r["tenant"])][r["window"]][r["variant"]] = r
    names = {"exfm": exfm_variant, "blend": BLEND, "control": CONTROL, "base_rate": BASE_RATE}
    out = []
    for _, windows in sorted(by_key.items()):
        history: list[dict] = []
        for t in sorted(windows):
            cell = windows[t]
            if any(names[c] not in cell for c in CANDIDATES if c != "blend"):
                continue
            served = decide(history, trailing).serve if history else "exfm"
            out.append({**cell[names[served]], "variant": f"{exfm_variant}+guard", "served": served})
            merged = {"window": t, "rows": cell[exfm_variant]["rows"], "positives": cell[exfm_variant]["positives"]}
            for c in CANDIDATES:
                if names[c] in cell:  # without a blend record, the guard of three candidates
                    merged[LOG_LOSS_KEY[c]] = cell[names[c]]["log_loss"]
            history.append(merged)
    return out


def worst_excess(records: list[dict], variant: str, baseline: str, span: int, warmup: int) -> float:
    """Largest relative NE excess (%) of `variant` over `baseline` over any `span` consecutive
    windows after warm-up: NE pooled over the span's rows per tenant and seed, then the mean over
    seeds, the maximum over tenants and spans. NaN when nothing compares."""
    cells: dict[tuple[str, int, int], dict[str, dict]] = defaultdict(dict)
    for r in records:
        if r["variant"] in (variant, baseline) and r["window"] >= warmup:
            cells[(r["tenant"], r["seed"], r["window"])][r["variant"]] = r
    worst = math.nan
    tenants = sorted({k[0] for k in cells})
    for tenant in tenants:
        windows = sorted({k[2] for k in cells if k[0] == tenant})
        seeds = sorted({k[1] for k in cells if k[0] == tenant})
        for i in range(len(windows) - span + 1):
            span_w = windows[i : i + span]
            excess = []
            for seed in seeds:
                rs = [cells.get((tenant, seed, w), {}) for w in span_w]
                if any(variant not in c or baseline not in c for c in rs):
                    continue
                a = pooled_ne([c[variant] for c in rs], "log_loss")
                b = pooled_ne([c[baseline] for c in rs], "log_loss")
                if math.isfinite(a) and math.isfinite(b):
                    excess.append(100 * (a - b) / b)
            if excess:
                e = float(np.mean(excess))
                worst = e if math.isnan(worst) else max(worst, e)
    return worst
