"""The pure parts of `exfm bench tenants`: the /proc sampler, the per-tenant arithmetic, the summary
and the plot. The bench itself needs a local Ray (run it with `exfm bench tenants`)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from benches.tenants import per_tenant, plot, summary
from exfm_ray.bench.proc_tree import CLK_TCK, TreeSample, cpu_seconds, idle_cost, sample_tree

pytestmark = pytest.mark.unit


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


def test_the_sampler_sees_a_childs_memory():
    """Sampled under a parent this test owns: the pytest process may have a Ray of its own below it,
    whose workers come and go."""
    # Bytes of 1, not a zeroed bytearray: every page is written, so resident.
    child = "import time; x = b'\\1' * 50_000_000; print('ready', flush=True); time.sleep(30)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; input(); subprocess.run([sys.executable, '-c', {child!r}])"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        before = sample_tree(parent.pid)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "ready"
        with_child = sample_tree(parent.pid)
    finally:
        for proc in {c[0] for c in sample_tree(parent.pid).cpu_ticks}:
            os.kill(proc, signal.SIGKILL)
        _stop(parent)
    assert len(before.cpu_ticks) == 0 and len(with_child.cpu_ticks) == 1
    assert with_child.rss_kb - before.rss_kb >= 40 * 1024
    assert with_child.pss_kb - before.pss_kb >= 40 * 1024


def test_the_sampler_counts_a_busy_childs_cpu_time_and_not_a_sleeping_ones():
    busy = _child("print('ready', flush=True)\nwhile True: pass")
    sleeping = _child("import time; print('ready', flush=True); time.sleep(30)")
    try:
        assert busy.stdout.readline().strip() == sleeping.stdout.readline().strip() == "ready"
        a = sample_tree()
        time.sleep(1.5)
        b = sample_tree()
    finally:
        _stop(busy)
        _stop(sleeping)

    def of(proc, sample):
        return sum(t for (pid, _), t in sample.cpu_ticks.items() if pid == proc.pid) / CLK_TCK

    assert of(busy, b) - of(busy, a) >= 0.2  # a shared 2-core machine still gives it a good part of 1.5 s
    assert of(sleeping, b) - of(sleeping, a) < 0.1
    assert cpu_seconds(a, b) >= 0.2


def test_cpu_time_counts_a_new_process_in_full_and_a_reused_pid_as_another_process():
    a = TreeSample(0.0, 0, 0, {(10, 1): 100, (11, 5): 50})
    # pid 11 was reused (new start time): its 20 ticks are all new; pid 12 started in between.
    b = TreeSample(2.0, 0, 0, {(10, 1): 100 + 2 * CLK_TCK, (11, 9): 20, (12, 7): CLK_TCK})
    assert cpu_seconds(a, b) == pytest.approx(3 + 20 / CLK_TCK)


def test_idle_cost_takes_the_median_memory_and_the_cpu_share_over_the_interval():
    mb = 1024
    samples = [
        TreeSample(100.0, 500 * mb, 300 * mb, {(1, 1): 0}),
        TreeSample(105.0, 900 * mb, 700 * mb, {(1, 1): CLK_TCK}),  # a worker starting: not the idle level
        TreeSample(110.0, 510 * mb, 310 * mb, {(1, 1): 2 * CLK_TCK, (2, 3): 0}),
    ]
    got = idle_cost(samples)
    assert got == {"rss_mb": 510, "pss_mb": 310, "cpu_share": pytest.approx(0.2), "processes": 2}


def test_per_tenant_is_the_cost_over_the_baseline_divided_by_the_tenants():
    baseline = {"rss_mb": 100.0, "pss_mb": 80.0, "cpu_share": 0.05, "processes": 12}
    idle = {"rss_mb": 500.0, "pss_mb": 280.0, "cpu_share": 0.45, "processes": 40}
    assert per_tenant(idle, baseline, 4) == pytest.approx(
        {"idle_rss_mb_per_tenant": 100.0, "idle_pss_mb_per_tenant": 50.0, "idle_cpu_share_per_tenant": 0.1}
    )


def _result(serve: bool = True) -> dict:
    curve = [
        {
            "tenants": n, "window": w, "idle_rss_mb_total": 900.0 + 150 * n, "idle_pss_mb_total": 600.0 + 90 * n,
            "idle_cpu_share_total": 0.04 + 0.01 * n, "idle_rss_mb_per_tenant": 150.0, "idle_pss_mb_per_tenant": 90.0,
            "idle_cpu_share_per_tenant": 0.01, "peak_rss_mb_total": 2000.0 * n, "peak_pss_mb_total": 1500.0 * n,
            "commit_to_publish_s": {"median": 3.0 * n, "max": 4.0 * n}, "catch_up_s": 6.0, "rows_per_s": 1234.5,
            "ray_processes": 20 + 9 * n, "train_runs": min(n, 4),
        }
        for w, n in enumerate([1, 2, 4], start=1)
    ]  # fmt: skip
    return {
        "max_tenants": 4,
        "all_trained_every_window": True,
        "idle_rss_mb_per_tenant": 150.0,
        "idle_pss_mb_per_tenant": 90.0,
        "idle_cpu_share_per_tenant": 0.01,
        "serve_p99_ratio": 1.02 if serve else None,
        "max_models_per_replica": 3 if serve else None,
        "baseline": {
            "idle_rss_mb_total": 900.0,
            "idle_pss_mb_total": 600.0,
            "idle_cpu_share": 0.04,
            "ray_processes": 20,
        },
        "curve": curve,
        "max_concurrent": 4,
        "tenants_per_run": None,
    }


def test_summary_renders_a_row_per_count_and_the_headline():
    text = summary(_result())
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 + 3  # header, baseline, one per count
    assert rows[1].startswith("| 0 (baseline) |") and rows[-1].startswith("| 4 | 90.0 (960) | 150.0 (1,500) |")
    assert "12.0 / 16.0 s" in rows[-1] and "| 56 (4) |" in rows[-1]
    assert "trained every window once, in order: yes" in text and "p99 every tenant in turn / one tenant 1.02" in text
    assert "Serve part: skipped" in summary(_result(serve=False))
    assert "Serve part: TimeoutError('x')" in summary({**_result(serve=False), "serve": {"error": "TimeoutError('x')"}})


def test_plot_writes_a_png(tmp_path):
    path = plot(_result(), tmp_path / "sub" / "tenants.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
