import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Unit tests never start Ray: anything that tries fails loudly."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray (use tests/ray)")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="module")
def world():
    """A small synthetic stream and one tenant window with random FM columns (students' unit tests)."""
    import torch

    from exfm_ray.data.batching import WindowTensors
    from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream

    gen = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=400, num_tenants=2))
    stream = gen.stream()
    rows = WindowTensors(stream.tenant_rows(1, "feed"), stream.spec)
    rows.set_fm(torch.randn(rows.num_rows), torch.rand(rows.num_rows) > 0.3)
    return stream.spec, rows
