"""`exfm bench scale`'s pieces that need no cluster: the peak-RSS readings and the report."""

import os

from benches.scale import plot, summary
from exfm_ray.bench.proc_tree import peak_rss_mb


def test_peak_rss_is_read_for_a_live_process_and_zero_for_a_gone_one():
    mine = peak_rss_mb(os.getpid())
    assert 10 < mine < 100_000
    assert peak_rss_mb(2**22 + 12345) == 0.0


def test_the_report_names_each_size_and_the_growth(tmp_path):
    r = {
        "rows": [100_000, 3_000_000],
        "driver_peak_rss_mb": [500.0, 510.0],
        "driver_rss_growth": 1.02,
        "das_rows_per_s": [9000.0, 15000.0],
        "das_wall_s": [11.0, 200.0],
        "fm_rank_peak_rss_mb": [600.0, 620.0],
        "das_worker_peak_rss_mb": [300.0, 700.0],
        "trainer_peak_rss_mb": [None, None],
        "trainer_wall_s": [None, None],
        "das_ratio": 0.95,
    }
    text = summary(r)
    assert "100,000: 500 MB" in text and "3,000,000: 510 MB" in text and "1.02x" in text and "0.95" in text
    assert plot(r, tmp_path / "scale.png").stat().st_size > 10_000
