"""What a committed DAS window leaves for people and dashboards: one log line, Ray metrics."""

from __future__ import annotations

from exfm_ray.das.store import WindowRecord


def record_metrics(rec: WindowRecord) -> None:
    from exfm_ray.observability import LOG, counter, gauge

    # Ray counters accept only positive increments.
    for name, text, value in (
        ("das_rows", "Augmented rows committed by the DAS", rec.output_rows),
        ("das_masked_rows", "Augmented rows with the FM mask off", rec.masked_rows),
        ("das_fm_calls", "Examples the DAS sent to the FM (unique example_ids)", rec.fm_calls),
    ):
        if value > 0:
            counter(name, text).inc(value)
    gauge("das_rows_per_s", "Rows per second of the last committed window").set(
        rec.output_rows / max(rec.duration_s, 1e-9)
    )
    LOG.info(summary_line({"window": rec.window, "status": "committed", "record": rec}))


def summary_line(result: dict) -> str:
    r = result["record"]
    if r is None:
        return f"window {result['window']}: {result['status']}"
    rec = r if isinstance(r, WindowRecord) else WindowRecord.model_validate(r)
    return (
        f"window {rec.window}: {result['status']}, {rec.output_rows} rows, {rec.fm_calls} FM calls "
        f"({rec.amortization:.2f} per row), FM {','.join(rec.fm_versions) or '-'}, masked {rec.masked_rows}, "
        f"{rec.duration_s:.1f} s"
    )
