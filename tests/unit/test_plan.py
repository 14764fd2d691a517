"""`exfm plan`: TorchRec's planner on a simulated GPU cluster, from this CPU machine (FM built on `meta`)."""

import argparse
import json

import pytest

from exfm_ray.errors import ConfigError
from exfm_ray.fm.plan import GiB, PlanSpec, plan_fm
from jobs import plan_cmd

pytestmark = pytest.mark.unit

REQUIRED_JSON_KEYS = {"total_params", "fits", "max_rank_hbm_gb", "sharding_types"}


def spec(**fields) -> PlanSpec:
    return PlanSpec.parse(fields, source="test")


@pytest.fixture(scope="module")
def small():
    return plan_fm(spec(fm_params=1e9, gpus=8, hbm_gb=80, batch_size=512))


def test_small_plan_fits_and_adds_up(small):
    r = small
    assert r.fits and r.reason is None and not r.timed_out and r.module == "FoundationModel"
    assert r.total_params == pytest.approx(1e9, rel=1e-3)
    assert r.total_params == r.embedding_params + r.dense_params
    assert r.embedding_params == sum(t.rows * t.dim for t in r.tables)
    assert 0 < r.dense_params < 1e-2 * r.total_params

    # every table got a sharding type and a kernel, and the counts add up
    assert set(r.sharding_types) == set(r.compute_kernels) == {t.name for t in r.tables}
    assert sum(r.sharding_type_counts.values()) == len(r.tables) == 26
    assert r.num_shards >= len(r.tables)

    # per-rank memory: one entry per GPU, under the budget left after the reservation
    assert len(r.per_rank_hbm_gb) == len(r.per_rank_ddr_gb) == 8
    assert r.max_rank_hbm_gb == max(r.per_rank_hbm_gb) <= r.hbm_budget_gb == pytest.approx(80 * 0.85)
    assert r.min_rank_hbm_gb <= r.median_rank_hbm_gb <= r.max_rank_hbm_gb
    assert r.max_rank_ddr_gb == 0  # no --ddr-gb: everything in HBM

    # bytes: fp32 weights + row-wise Adagrad (1 fp32 per row) + the shards' I/O buffers at batch 512
    weights = r.embedding_params * 4 / GiB
    optimizer = sum(t.rows for t in r.tables) * 4 / GiB
    assert r.weights_gb == pytest.approx(weights, abs=1e-3)
    assert r.optimizer_state_gb == pytest.approx(optimizer, abs=1e-3)
    placed = sum(r.per_rank_hbm_gb)
    assert placed == pytest.approx(sum(t.hbm_gb for t in r.tables), abs=0.01)
    assert weights + optimizer <= placed <= 1.05 * (weights + optimizer)


def test_impossible_plan_reports_not_fitting_without_raising():
    r = plan_fm(spec(fm_params=1e12, gpus=2, hbm_gb=16))
    assert r.fits is False
    assert "insufficient storage" in r.reason
    assert r.max_rank_hbm_gb is None and r.per_rank_hbm_gb == [] and r.sharding_types == {}
    assert r.weights_gb + r.optimizer_state_gb > r.cluster_budget_gb
    json.dumps(r.to_dict())  # still a report a machine can read


def test_host_memory_lets_uvm_caching_fit_what_hbm_alone_cannot():
    hbm_only = plan_fm(spec(fm_params=1e10, gpus=2, hbm_gb=16))
    with_ddr = plan_fm(spec(fm_params=1e10, gpus=2, hbm_gb=16, ddr_gb=64))
    assert not hbm_only.fits
    assert with_ddr.fits and with_ddr.compute_kernel_counts.get("fused_uvm_caching", 0) >= 1
    assert 0 < with_ddr.max_rank_ddr_gb <= 64 and with_ddr.max_rank_hbm_gb <= with_ddr.hbm_budget_gb


def test_an_ssd_tier_lets_key_value_tables_fit_what_hbm_and_ddr_cannot():
    """A small model of the 12T case: the tables outgrow HBM + DDR; with SSD the planner puts the
    largest on TorchRec's key-value (SSD-backed) kernel, and the report says what was missing."""
    without = plan_fm(spec(fm_params=1e10, gpus=2, hbm_gb=4, ddr_gb=8))
    assert not without.fits and without.gpus_needed > 2
    need = without.weights_gb + without.optimizer_state_gb
    assert without.cluster_budget_gb < need <= without.gpus_needed * (without.hbm_budget_gb + 8)
    with_ssd = plan_fm(spec(fm_params=1e10, gpus=2, hbm_gb=4, ddr_gb=8, ssd_gb=64))
    assert with_ssd.fits and with_ssd.compute_kernel_counts.get("key_value", 0) >= 1, with_ssd.compute_kernel_counts
    assert 0 < with_ssd.max_rank_ssd_gb <= 64 and sum(with_ssd.per_rank_ssd_gb) == pytest.approx(
        sum(t.ssd_gb for t in with_ssd.tables), abs=0.01
    )


def test_explicit_tables_with_mixed_dims_plan_as_a_bare_ebc():
    tables = [{"name": "user_id", "rows": 5_000_000, "dim": 64}, {"name": "country", "rows": 300, "dim": 16}]
    r = plan_fm(spec(tables=tables, gpus=4, hbm_gb=16))
    assert r.fits and r.module == "EmbeddingBagCollection" and r.dense_params == 0
    assert r.total_params == 5_000_000 * 64 + 300 * 16
    assert set(r.sharding_types) == {"user_id", "country"}


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"fm_params": 1e9, "gpus": 0, "hbm_gb": 80}, "'gpus'"),
        ({"fm_params": -1e9, "gpus": 8, "hbm_gb": 80}, "'fm_params'"),
        ({"fm_params": 1e9, "gpus": 8, "hbm_gb": 0}, "'hbm_gb'"),
        ({"fm_params": 1e9, "gpus": 12, "hbm_gb": 80}, "'local_world_size'"),
        ({"fm_params": 1e9, "gpus": 8, "hbm_gb": 80, "embedding_dim": 30}, "'embedding_dim'"),
        ({"gpus": 8, "hbm_gb": 80}, "fm_params or tables"),
        ({"tables": [{"name": "a", "rows": 1}, {"name": "a", "rows": 2}], "gpus": 8, "hbm_gb": 80}, "duplicate"),
    ],
)
def test_invalid_input_raises_config_error_naming_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        spec(**fields)


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="exfm")
    plan_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.run(args)


def test_cli_json_prints_the_required_keys(capsys):
    assert _run_cli(["--fm-params", "1e9", "--gpus", "8", "--hbm-gb", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= REQUIRED_JSON_KEYS
    assert data["fits"] is True and data["total_params"] == pytest.approx(1e9, rel=1e-3)
    assert data["max_rank_hbm_gb"] <= 80 and len(data["sharding_types"]) == 26


def test_cli_human_output_says_why_a_plan_does_not_fit(capsys):
    assert _run_cli(["--fm-params", "1e12", "--gpus", "2", "--hbm-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "--ddr-gb" in out and "Traceback" not in out


def test_cli_reads_a_table_file(tmp_path, capsys):
    (tmp_path / "tables.yaml").write_text(
        "tables:\n  - {name: user_id, rows: 1000000}\n  - {name: ad_id, rows: 5000}\n"
    )
    assert _run_cli(["--tables", str(tmp_path / "tables.yaml"), "--gpus", "2", "--hbm-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "user_id" in out and "busiest GPUs" in out


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--gpus", "8", "--hbm-gb", "80"], "--fm-params"),
        (["--fm-params", "1e9", "--tables", "t.yaml", "--gpus", "8", "--hbm-gb", "80"], "--tables"),
        (["--tables", "does-not-exist.yaml", "--gpus", "8", "--hbm-gb", "80"], "no such file"),
        (["--fm-params", "1e9", "--gpus", "0", "--hbm-gb", "80"], "'gpus'"),
    ],
)
def test_cli_user_errors_are_config_errors(argv, named):
    with pytest.raises(ConfigError, match=named):
        _run_cli(argv)
