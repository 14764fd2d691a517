import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Unit tests never start Ray: anything that tries fails loudly."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray (use tests/ray)")

    monkeypatch.setattr(ray, "init", refuse)
