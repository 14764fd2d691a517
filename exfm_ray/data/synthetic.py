"""Synthetic multi-tenant ads stream with known ground truth and controllable drift.

Ground truth for a row of tenant d in window t (all terms drawn once from the seed):

    z = b_d + a_d * <U_user(t), V_ad> + g_d * [ad_category in user_topics]
        + slot_d[slot] + user_bias + ad_bias + device + hour + c . dense
    label ~ Bernoulli(sigmoid(z))

- Drift: user factors rotate in the plane of two random bases, U(t) = U0 cos(drift t) + U1 sin(drift t),
  so `drift` (radians per window) controls how fast yesterday's model goes stale.
- Positive rate: b_d is solved per tenant (bisection on a large window-0 sample) so the expected
  positive rate is `positive_rate`.
- Tenants share users, ads and the affinity structure (that is what an FM trained on the union can
  learn) but each has its own scale a_d, topic weight g_d, bias and a tenant-specific `slot`
  feature logged only on its rows.
- The FM sees every feature; students see their tenant's subset, which leaves out `user_topics`
  and `user_activity` (too costly for a small serving model), so a good FM knows more than a student.
- Overlap: a share of examples is logged by a second tenant too (same example_id, same features,
  same label, drawn from the first tenant's probability), which exercises dedup in the DAS.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from exfm_ray.configbase import Config
from exfm_ray.data.stream import LoadReport, Stream, build_stream, single_ids
from exfm_ray.schema import SparseFeature, StreamSpec, TenantSpec, arrow_schema

TENANT_NAMES = ("feed", "stories", "search", "reels", "marketplace", "video", "news", "games")


class SyntheticConfig(Config):
    num_windows: int = Field(12, ge=2, description="Number of time windows.")
    rows_per_window: int = Field(20000, ge=100, description="Examples per window (before overlap).")
    num_tenants: int = Field(3, ge=1, le=len(TENANT_NAMES), description="Number of tenants.")
    tenant_shares: list[float] | None = Field(
        None, description="Traffic share per tenant; default halves from one tenant to the next."
    )
    overlap: float = Field(0.15, ge=0.0, le=1.0, description="Share of examples also logged by a 2nd tenant.")
    positive_rate: float = Field(0.1, ge=0.001, le=0.9, description="Target positive rate per tenant.")
    drift: float = Field(0.15, ge=0.0, le=3.2, description="Rotation of user factors per window (radians).")
    num_users: int = Field(1000, ge=10, description="Users (cardinality of user_id).")
    num_ads: int = Field(200, ge=10, description="Ads (cardinality of ad_id).")
    num_categories: int = Field(24, ge=2, description="Ad categories = user topics.")
    latent_dim: int = Field(8, ge=1, description="Rank of the user x ad affinity.")
    zipf_exponent: float = Field(
        0.9, gt=0, description="Popularity of users and ads ~ 1 / rank**exponent (higher = heavier head)."
    )
    cold_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of users and of ads absent from window 0 that join later, evenly over the windows.",
    )
    signal: float = Field(1.0, gt=0, description="Scale of all ground-truth effects (higher = easier).")
    window_seconds: int = Field(86_400, gt=0, description="Length of a window in seconds.")
    start_time: int = Field(1_704_067_200, description="Unix time of the start of window 0.")
    seed: int = Field(0, description="Seed: the same seed gives the same stream.")

    @model_validator(mode="after")
    def _shares(self) -> SyntheticConfig:
        if self.tenant_shares is not None and len(self.tenant_shares) != self.num_tenants:
            raise ValueError(f"tenant_shares has {len(self.tenant_shares)} values for {self.num_tenants} tenants")
        return self


class SyntheticStream:
    """The generator; holds the ground-truth parameters so tests can inspect them."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        k, s = cfg.latent_dim, cfg.signal
        self.tenants = list(TENANT_NAMES[: cfg.num_tenants])
        shares = np.asarray(cfg.tenant_shares or [0.5**i for i in range(cfg.num_tenants)], dtype=float)
        self.shares = shares / shares.sum()
        self.user_pop = _zipf(cfg.num_users, cfg.zipf_exponent, rng)
        self.ad_pop = _zipf(cfg.num_ads, cfg.zipf_exponent, rng)
        self.user_joins = _joins(cfg.num_users, cfg.cold_share, cfg.num_windows, rng)
        self.ad_joins = _joins(cfg.num_ads, cfg.cold_share, cfg.num_windows, rng)
        self.u0 = rng.normal(0, 1 / np.sqrt(k), (cfg.num_users, k))
        self.u1 = rng.normal(0, 1 / np.sqrt(k), (cfg.num_users, k))
        self.v = rng.normal(0, 1.0, (cfg.num_ads, k))
        self.ad_category = rng.integers(0, cfg.num_categories, cfg.num_ads)
        self.user_topics = [
            rng.choice(cfg.num_categories, rng.integers(1, 5), replace=False) for _ in range(cfg.num_users)
        ]
        self.user_bias = rng.normal(0, 0.5 * s, cfg.num_users)
        self.ad_bias = rng.normal(0, 0.5 * s, cfg.num_ads)
        self.device_eff = rng.normal(0, 0.2 * s, 4)
        self.hour_eff = 0.3 * s * np.sin(np.arange(24) / 24 * 2 * np.pi + rng.uniform(0, 6.3))
        self.dense_coef = rng.normal(0, 0.3 * s, 2)
        d = cfg.num_tenants
        self.affinity_scale = s * rng.uniform(1.0, 1.8, d)
        self.topic_weight = s * rng.uniform(0.6, 1.4, d)
        self.slot_eff = rng.normal(0, 0.6 * s, (d, 16))
        self.tenant_bias = np.zeros(d)
        self._rng = rng
        calib = self._examples(0, 20_000, rng)
        for i in range(d):
            z = self._logit(calib, 0, np.full(len(calib["user_id"]), i))
            self.tenant_bias[i] = _solve_bias(z, cfg.positive_rate)

    def user_factors(self, t: int) -> np.ndarray:
        a = self.cfg.drift * t
        return self.u0 * np.cos(a) + self.u1 * np.sin(a)

    def spec(self) -> StreamSpec:
        c = self.cfg
        sparse = [
            SparseFeature(name="user_id", cardinality=c.num_users),
            SparseFeature(name="ad_id", cardinality=c.num_ads),
            SparseFeature(name="ad_category", cardinality=c.num_categories),
            SparseFeature(name="device", cardinality=4),
            SparseFeature(name="hour", cardinality=24),
            SparseFeature(name="user_topics", cardinality=c.num_categories, multi_valued=True),
        ] + [SparseFeature(name=f"{t}_slot", cardinality=16) for t in self.tenants]
        shared = ["user_id", "ad_id", "ad_category", "device", "hour"]
        tenants = [TenantSpec(name=t, features=[*shared, f"{t}_slot"], dense=["bid"]) for t in self.tenants]
        return StreamSpec(
            name="synthetic",
            description=(
                f"synthetic ads stream, seed {c.seed}, {c.num_tenants} tenants, drift {c.drift} rad/window, "
                f"positive rate {c.positive_rate}, {c.window_seconds}s windows"
            ),
            sparse=sparse,
            dense=["bid", "user_activity"],
            tasks=["click"],
            tenants=tenants,
            window_starts=[c.start_time + t * c.window_seconds for t in range(c.num_windows)],
        )

    def _examples(self, t: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        c = self.cfg
        return {
            "user_id": rng.choice(c.num_users, n, p=_present(self.user_pop, self.user_joins, t)),
            "ad_id": rng.choice(c.num_ads, n, p=_present(self.ad_pop, self.ad_joins, t)),
            "device": rng.integers(0, 4, n),
            "hour": rng.integers(0, 24, n),
            "slot": rng.integers(0, 16, (n, c.num_tenants)),
            "bid": rng.normal(0, 1, n).astype(np.float32),
            "user_activity": rng.normal(0, 1, n).astype(np.float32),
        }

    def _logit(self, ex: dict[str, np.ndarray], t: int, tenant: np.ndarray) -> np.ndarray:
        users, ads = ex["user_id"], ex["ad_id"]
        affinity = np.einsum("nk,nk->n", self.user_factors(t)[users], self.v[ads])
        match = np.fromiter(
            (self.ad_category[a] in self.user_topics[u] for u, a in zip(users, ads, strict=True)), bool, len(users)
        )
        slot = ex["slot"][np.arange(len(users)), tenant]
        return (
            self.tenant_bias[tenant]
            + self.affinity_scale[tenant] * affinity
            + self.topic_weight[tenant] * match
            + self.slot_eff[tenant, slot]
            + self.user_bias[users]
            + self.ad_bias[ads]
            + self.device_eff[ex["device"]]
            + self.hour_eff[ex["hour"]]
            + self.dense_coef[0] * ex["bid"]
            + self.dense_coef[1] * ex["user_activity"]
        )

    def true_prob(self, table: pa.Table) -> np.ndarray:
        """Ground-truth probability of each row of a generated window (the Bayes-optimal predictor)."""
        tenant = np.array([self.tenants.index(x) for x in table.column("tenant").to_pylist()])
        n = table.num_rows
        slot = np.zeros((n, self.cfg.num_tenants), dtype=np.int64)
        for i, name in enumerate(self.tenants):
            col = table.column(f"{name}_slot").to_pylist()
            slot[:, i] = [v[0] if v else 0 for v in col]
        ex = {
            "user_id": np.array([v[0] for v in table.column("user_id").to_pylist()]),
            "ad_id": np.array([v[0] for v in table.column("ad_id").to_pylist()]),
            "device": np.array([v[0] for v in table.column("device").to_pylist()]),
            "hour": np.array([v[0] for v in table.column("hour").to_pylist()]),
            "slot": slot,
            "bid": table.column("bid").to_numpy(),
            "user_activity": table.column("user_activity").to_numpy(),
        }
        primary = self._primary_tenant(table, tenant)
        t = int(table.column("window")[0].as_py())
        return _sigmoid(self._logit(ex, t, primary))

    def _primary_tenant(self, table: pa.Table, tenant: np.ndarray) -> np.ndarray:
        # The label of an overlapped example comes from the tenant that logged it first (lowest row).
        ids = table.column("example_id").to_numpy()
        _, first = np.unique(ids, return_index=True)
        first_tenant = dict(zip(ids[first], tenant[first], strict=True))
        return np.array([first_tenant[i] for i in ids])

    def window(self, t: int) -> pa.Table:
        c = self.cfg
        rng = np.random.default_rng([c.seed, t])
        n = c.rows_per_window
        ex = self._examples(t, n, rng)
        primary = rng.choice(c.num_tenants, n, p=self.shares)
        label = (rng.random(n) < _sigmoid(self._logit(ex, t, primary))).astype(np.float32)
        second = (primary + 1 + rng.integers(0, max(c.num_tenants - 1, 1), n)) % c.num_tenants
        overlapped = (rng.random(n) < c.overlap) & (c.num_tenants > 1)
        times = np.sort(rng.integers(0, c.window_seconds, n)) + c.start_time + t * c.window_seconds
        # Row list: every example once for its primary tenant, plus once more for overlapped ones.
        idx = np.concatenate([np.arange(n), np.flatnonzero(overlapped)])
        tenant = np.concatenate([primary, second[overlapped]])
        order = np.lexsort((np.arange(len(idx)), times[idx]))
        idx, tenant = idx[order], tenant[order]
        logged_by = {i: {int(primary[i])} for i in range(n)}
        for i in np.flatnonzero(overlapped):
            logged_by[int(i)].add(int(second[i]))
        columns = {
            "example_id": (t * 10_000_000 + idx).astype(np.int64),
            "event_time": times[idx].astype(np.int64),
            "window": np.full(len(idx), t, np.int32),
            "tenant": np.array(self.tenants)[tenant],
            "label_click": label[idx],
            "bid": ex["bid"][idx],
            "user_activity": ex["user_activity"][idx],
        }
        single = {k: ex[k][idx] for k in ("user_id", "ad_id", "device", "hour")}
        single["ad_category"] = self.ad_category[ex["ad_id"][idx]]
        arrays = {k: single_ids(v) for k, v in single.items()}
        arrays["user_topics"] = pa.array(
            [self.user_topics[u].tolist() for u in ex["user_id"][idx]], pa.list_(pa.int64())
        )
        for j, name in enumerate(self.tenants):
            arrays[f"{name}_slot"] = pa.array(
                [[int(ex["slot"][i, j])] if j in logged_by[int(i)] else [] for i in idx], pa.list_(pa.int64())
            )
        schema = arrow_schema(self.spec())
        data = {**columns, **arrays}
        return pa.table({f.name: data[f.name] for f in schema}, schema=schema)

    def stream(self) -> Stream:
        table = pa.concat_tables(self.window(t) for t in range(self.cfg.num_windows))
        return build_stream(table, self.spec(), LoadReport(rows_read=table.num_rows))


def synthetic_stream(cfg: SyntheticConfig) -> Stream:
    return SyntheticStream(cfg).stream()


def _zipf(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    w = w[rng.permutation(n)]
    return w / w.sum()


def _joins(n: int, cold_share: float, num_windows: int, rng: np.random.Generator) -> np.ndarray:
    """Window in which each id first appears: 0 for most, 1..num_windows-1 for a cold share."""
    joins = np.zeros(n, np.int64)
    if cold_share > 0 and num_windows > 1:
        cold = rng.random(n) < cold_share
        joins[cold] = rng.integers(1, num_windows, int(cold.sum()))
    return joins


def _present(pop: np.ndarray, joins: np.ndarray, t: int) -> np.ndarray:
    p = np.where(joins <= t, pop, 0.0)
    return p / p.sum()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _solve_bias(z: np.ndarray, rate: float) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(z + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
