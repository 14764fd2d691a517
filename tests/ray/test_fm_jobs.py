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


def test_train_publish_start_status_stop(ray_cluster, tmp_path, capsys):
    stream, store = tmp_path / "stream", tmp_path / "store"
    assert main(["stream", "--windows", "3", "--rows-per-window", "1500", "--out", str(stream)]) == 0
    common = ["--address", ray_cluster, "--storage", str(store)]

    # `fm train`, status and stop in this process (the CLI's code path, without another interpreter importing
    # ray and torch); `fm start` runs as its own process: the group must outlive the one that started it.
    capsys.readouterr()
    # fm-0001 on one rank; fm-0002 continues from it on two (the checkpoint reshards as a job scales up)
    one = ["--workers", "1"]
    assert main(["fm", "train", *common, "--stream", str(stream), "--through-window", "0", "--size", "1", *one]) == 0
    assert "published fm-0001" in capsys.readouterr().out
    assert main(["fm", "train", *common, "--stream", str(stream), "--through-window", "1", "--size", "1"]) == 0
    assert "published fm-0002" in capsys.readouterr().out  # incremental: continues from fm-0001 with window 1
    covered = FMTrainConfig(storage=str(store), stream=str(stream), through_window=1, fm=FMConfig(size=1))
    assert train_fm(covered) is None  # the current version already covers window 1: no job launched

    registry = FMRegistry(store)
    v1, v2 = registry.versions()
    spec = read_spec(stream)
    assert v1.through_window == 0 and v2.through_window == 1 and registry.current().version == "fm-0002"
    assert v1.watermark < spec.window_starts[1] <= v2.watermark < spec.window_starts[2]
    assert all(np.isfinite(x) for x in [*v1.metrics.values(), *v2.metrics.values()])
    # 2 ranks: the data-parallel layers stay identical, so rank 0's checkpoint matches what trained.
    assert v2.metrics["dense_replica_gap"] == 0.0
    assert registry.for_window(spec.window_starts[1]).version == "fm-0001"  # the leakage guard's pick

    # Trained with the planner's choice, served column-wise: the DCP checkpoint reshards.
    exfm("fm", "start", *common, "--name", "fm-cli", "--sharding", "column_wise")
    try:
        capsys.readouterr()
        assert main(["fm", "status", *common, "--name", "fm-cli", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
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
        capsys.readouterr()
        assert main(["fm", "stop", *common, "--name", "fm-cli"]) == 0
        assert "stopped" in capsys.readouterr().out
    assert find_fm_group("fm-cli") is None


def _train_workers() -> list[int]:
    """Pids of the Ray Train workers alive on this machine (this tier has no dashboard: no state API)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    assert pids, "no Ray Train worker running"
    return pids


def _files(folder) -> dict:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_following_fm_job_publishes_each_window_and_never_rewrites_a_published_version(ray_cluster, tmp_path):
    """The job trains each window as the stream writer adds it. A worker killed while it waits makes
    Ray Train restart the run: it resumes after its last version (with names reserved at launch it
    trained window 0 again into fm-0001, the version being served). A new job after the first is
    cancelled continues after the newest version too."""
    import os
    import shutil
    import signal
    import time

    from actors.remote import train_fm_task

    full, stream, store = tmp_path / "full", tmp_path / "stream", tmp_path / "store"
    assert main(["stream", "--windows", "3", "--rows-per-window", "1500", "--out", str(full)]) == 0
    stream.mkdir()
    shutil.copy(full / "spec.json", stream)

    def write(t):  # the stream writer: a whole window appears at once
        shutil.copytree(full / f"window={t}", stream / f".w{t}")
        os.replace(stream / f".w{t}", stream / f"window={t}")

    def published(n):
        deadline = time.monotonic() + 300
        while len(FMRegistry(store).versions()) < n:
            assert not ray.wait([job], timeout=0)[0] or n == 0, ray.get(job)
            assert time.monotonic() < deadline, f"no version {n}"
            time.sleep(0.3)
        return FMRegistry(store).versions()

    write(0)
    # One rank: what is asserted here is the versions, not the sharding (the test above trains 2 ranks).
    cfg = FMTrainConfig(storage=str(store), stream=str(stream), through_window=2, follow=True, poll_s=0.3,
                        fm=FMConfig(size=1), num_workers=1)  # fmt: skip
    job = train_fm_task().remote(cfg)
    published(1)
    first = _files(store / "fm" / "versions" / "fm-0001")
    os.kill(_train_workers()[0], signal.SIGKILL)  # while the job waits for window 1
    time.sleep(3)
    write(1)
    assert [v.through_window for v in published(2)] == [0, 1]
    ray.cancel(job, force=True)  # the job is gone while it waits for window 2
    time.sleep(2)
    second = _files(store / "fm" / "versions" / "fm-0002")
    write(2)
    assert main(["fm", "train", "--address", ray_cluster, "--storage", str(store), "--stream", str(stream),
                 "--follow", "--through-window", "2", "--size", "1", "--workers", "1"]) == 0  # fmt: skip
    versions = FMRegistry(store).versions()
    assert [(v.version, v.through_window) for v in versions] == [("fm-0001", 0), ("fm-0002", 1), ("fm-0003", 2)]
    assert _files(store / "fm" / "versions" / "fm-0001") == first  # never written again
    assert _files(store / "fm" / "versions" / "fm-0002") == second


def test_fm_cli_user_errors_are_one_line(capsys, tmp_path):
    assert main(["fm", "start", "--storage", str(tmp_path), "--sharding", "row_wise", "--address", "x:1"]) == 2
    err = capsys.readouterr().err
    assert "row_wise needs CUDA" in err and "Traceback" not in err
