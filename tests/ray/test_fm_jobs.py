"""The FM operator path through the real CLI, against the shared local cluster (as `--address`)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from actors.launch import find_fm_group
from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.stream import read_spec, read_window
from exfm_ray.fm.model import FMConfig, build_fm
from exfm_ray.fm.registry import FMRegistry
from exfm_ray.fm.sharding import load_checkpoint
from exfm_ray.fm.train_job import FMTrainConfig, train_fm
from jobs.cli import main

pytestmark = pytest.mark.ray


def exfm(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_publish_start_status_stop(ray_cluster, tmp_path):
    stream, store = tmp_path / "stream", tmp_path / "store"
    assert main(["stream", "--windows", "3", "--rows-per-window", "1500", "--out", str(stream)]) == 0
    common = ["--address", ray_cluster, "--storage", str(store)]

    out = exfm("fm", "train", *common, "--stream", str(stream), "--through-window", "0", "--size", "1")
    assert "published fm-0001" in out
    out = exfm("fm", "train", *common, "--stream", str(stream), "--through-window", "1", "--size", "1")
    assert "published fm-0002" in out  # incremental: continues from fm-0001 with window 1
    covered = FMTrainConfig(storage=str(store), stream=str(stream), through_window=1, fm=FMConfig(size=1))
    assert train_fm(covered) is None  # the current version already covers window 1: no job launched

    registry = FMRegistry(store)
    v1, v2 = registry.versions()
    spec = read_spec(stream)
    assert v1.through_window == 0 and v2.through_window == 1 and registry.current().version == "fm-0002"
    assert v1.watermark < spec.window_starts[1] <= v2.watermark < spec.window_starts[2]
    assert all(np.isfinite(x) for x in [*v1.metrics.values(), *v2.metrics.values()])
    # 2 ranks: the data-parallel layers stay identical, so rank 0's checkpoint matches what trained.
    assert v1.metrics["dense_replica_gap"] == v2.metrics["dense_replica_gap"] == 0.0
    assert registry.for_window(spec.window_starts[1]).version == "fm-0001"  # the leakage guard's pick

    # Trained with the planner's choice, served column-wise: the DCP checkpoint reshards.
    exfm("fm", "start", *common, "--name", "fm-cli", "--sharding", "column_wise")
    try:
        status = json.loads(exfm("fm", "status", *common, "--name", "fm-cli", "--json"))
        assert status["version"]["version"] == "fm-0002" and status["ready"]
        assert set(status["gangs"][0]["plan"].values()) == {"column_wise"}
        table = read_window(stream, 2, spec).slice(0, 300)
        got = ray.get(find_fm_group("fm-cli").label.remote(table))
        fm = build_fm(spec, v2.fm)
        load_checkpoint(fm, v2.path)
        rows = WindowTensors(table, spec)
        b = rows.batch(0, rows.num_rows, spec.sparse_names)
        with torch.no_grad():
            want = fm.eval()(b.sparse, b.dense)
        np.testing.assert_allclose(got.logits, want.logits.numpy(), atol=1e-5)
    finally:
        assert "stopped" in exfm("fm", "stop", *common, "--name", "fm-cli")
    assert find_fm_group("fm-cli") is None


def test_fm_cli_user_errors_are_one_line(capsys, tmp_path):
    assert main(["fm", "start", "--storage", str(tmp_path), "--sharding", "row_wise", "--address", "x:1"]) == 2
    err = capsys.readouterr().err
    assert "row_wise needs CUDA" in err and "Traceback" not in err
