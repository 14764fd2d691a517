"""Streams by name: what `exfm experiment --dataset`, `exfm run --dataset` and `exfm stream` accept.

Each name is a partial SourceConfig. The rare-positive names reproduce the ads regime (CTR
0.5-3%, conversions 0.1-1%) on data anyone can see; see docs/data.md.
"""

from __future__ import annotations

from exfm_ray.errors import ConfigError

# Ads-like synthetic traffic: many users and ads with a heavy popularity tail, a third of them
# joining after the first window (cold ids), uneven tenants (the smallest logs 10% of traffic).
ADS_SYNTHETIC = {
    "num_windows": 8,
    "rows_per_window": 40_000,
    "num_tenants": 3,
    "tenant_shares": [0.6, 0.3, 0.1],
    "num_users": 3_000,
    "num_ads": 500,
    "zipf_exponent": 1.05,
    "cold_share": 0.3,
}

PRESETS: dict[str, dict] = {
    "synthetic": {"dataset": "synthetic"},
    "synthetic-ads": {"dataset": "synthetic", "synthetic": {**ADS_SYNTHETIC, "positive_rate": 0.01}},
    "synthetic-ads-rare": {"dataset": "synthetic", "synthetic": {**ADS_SYNTHETIC, "positive_rate": 0.002}},
    # Many small tenants (what `exfm run --tenants 6 --rows-per-window 5000` trains): 5,000 examples
    # a window over 6 tenants whose traffic halves from one to the next (2,500 rows down to 80).
    "synthetic-small-tenants": {
        "dataset": "synthetic",
        "synthetic": {"num_windows": 6, "rows_per_window": 5_000, "num_tenants": 6},
    },
    # Four times the users of `synthetic` (~6 rows per user and window instead of ~23): a
    # student's own user_id embedding learns less of each user, the FM's view of the user's past
    # events (LoopFM's histories) carries more.
    "synthetic-many-users": {"dataset": "synthetic", "synthetic": {"num_windows": 12, "num_users": 4_000}},
    "movielens": {"dataset": "movielens"},
    # 4-week windows: at 1% positives a weekly window of one tenant holds 0-17 positives.
    "movielens-rare": {"dataset": "movielens", "positive_rate": 0.01, "window_days": 28},
    "frappe": {"dataset": "frappe"},
    "frappe-rare": {"dataset": "frappe", "positive_rate": 0.01},
}
STREAMS = tuple(PRESETS)
RARE_STREAMS = ("synthetic-ads", "synthetic-ads-rare", "movielens-rare", "frappe-rare")
SMALL_STREAMS = ("synthetic-small-tenants",)


def preset(name: str) -> dict:
    """SourceConfig fields of a named stream (a fresh copy: callers may update it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown dataset {name!r}; choose from {list(STREAMS)}")
    out = dict(PRESETS[name])
    if "synthetic" in out:
        out["synthetic"] = dict(out["synthetic"])
    return out


def source_fields(
    dataset: str,
    *,
    base: dict | None = None,
    synthetic_defaults: dict | None = None,
    num_windows: int | None = None,
    rows_per_window: int | None = None,
    num_tenants: int | None = None,
    data_dir=None,
    data_path=None,
    mapping_path=None,
) -> dict:
    """SourceConfig fields for a command line: the named stream (byo when a file is given), then
    `base` (a YAML's `source`), then the flags. `synthetic_defaults` size plain `synthetic` only.

    --windows sets a synthetic stream's windows and Frappe's equal-count windows; --rows-per-window
    and --tenants apply to synthetic streams.
    """
    byo = data_path is not None or mapping_path is not None
    out = {"dataset": "byo"} if byo else preset(dataset)
    base = dict(base or {})
    synthetic = {**(synthetic_defaults or {} if dataset == "synthetic" else {}), **out.get("synthetic", {})}
    synthetic.update(base.pop("synthetic", None) or {})
    out.update(base)
    flags = {"num_windows": num_windows, "rows_per_window": rows_per_window, "num_tenants": num_tenants}
    synthetic.update({k: v for k, v in flags.items() if v})
    out["synthetic"] = synthetic
    if num_windows and out["dataset"] == "frappe":
        out["num_windows"] = num_windows
    out.setdefault("data_dir", data_dir)
    if out["data_dir"] is None:
        out["data_dir"] = data_dir
    if byo:
        out.update(data_path=data_path, mapping_path=mapping_path)
    return out
