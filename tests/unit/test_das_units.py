"""Read units of a stream window: every row read by exactly one unit, and an example whose rows
straddle a row-group cut read by one unit only (the DAS labels each example once)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exfm_ray.das.units import max_event_time, plan_window, read_unit


def _window(tmp_path, example_rows: list[int], row_group: int, files: int = 1):
    """Window 0 of a stream: example k has example_rows[k] contiguous rows."""
    ids = np.repeat(np.arange(len(example_rows)), example_rows)
    table = pa.table({"example_id": ids, "event_time": np.arange(len(ids)) * 3, "row": np.arange(len(ids))})
    folder = tmp_path / "stream" / "window=0"
    folder.mkdir(parents=True)
    cut = np.searchsorted(ids, np.linspace(0, len(example_rows), files + 1)[1:-1].astype(int)).tolist()
    for k, (a, b) in enumerate(zip([0, *cut], [*cut, len(ids)], strict=True)):  # files cut between examples
        pq.write_table(table.slice(a, b - a), folder / f"part-{k}.parquet", row_group_size=row_group)
    return table


@pytest.mark.parametrize("unit_rows", [1, 7, 15, 1000])
def test_every_row_is_read_once_and_no_example_spans_two_units(tmp_path, unit_rows):
    # Example 3 has 17 rows: it straddles several cuts of 5-row row groups, one of them whole.
    table = _window(tmp_path, [2, 1, 3, 17, 1, 4, 2, 2, 6, 1], row_group=5, files=2)
    units, rows = plan_window(tmp_path / "stream", 0, unit_rows)
    assert rows == table.num_rows
    parts = [read_unit(u) for u in units]
    assert pa.concat_tables(parts).column("row").to_pylist() == list(range(table.num_rows))
    owner = {}
    for k, part in enumerate(parts):
        for e in part.column("example_id").to_pylist():
            assert owner.setdefault(e, k) == k, f"example {e} read by units {owner[e]} and {k}"
    if unit_rows == 1:
        assert len(units) == 8 and sum(p.num_rows == 0 for p in parts) >= 1  # a row group inside example 3


def test_a_writer_that_scatters_an_example_loses_no_row(tmp_path):
    ids = np.array([0, 1, 2, 0, 3, 4, 5, 1, 6, 7])  # examples 0 and 1 come back later
    folder = tmp_path / "stream" / "window=0"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"example_id": ids, "event_time": ids}), folder / "part-0.parquet", row_group_size=3)
    units, rows = plan_window(tmp_path / "stream", 0, 3)
    got = pa.concat_tables(read_unit(u) for u in units).column("example_id").to_pylist()
    assert rows == 10 and got == ids.tolist()


def test_an_empty_window_gets_one_empty_unit_and_the_last_event_time_comes_from_statistics(tmp_path):
    table = _window(tmp_path, [2, 3], row_group=2)
    assert max_event_time(tmp_path / "stream", 0) == table.column("event_time").to_numpy().max()
    empty = tmp_path / "empty" / "window=0"
    empty.mkdir(parents=True)
    pq.write_table(table.slice(0, 0), empty / "part-0.parquet")
    units, rows = plan_window(tmp_path / "empty", 0, 10)
    assert rows == 0 and len(units) == 1 and read_unit(units[0]).num_rows == 0
