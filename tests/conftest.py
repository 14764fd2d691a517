import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The team's real datasets: EXFM_DATA_DIR, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("EXFM_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "movielens_100k").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared datasets not found (set EXFM_DATA_DIR)")
    return found


# In one process (plain `pytest`): cheap tiers first; then the multi-node module, before the tier's
# shared local Ray starts; then the rest of the Ray tier, whose shared Ray (and Serve) then stops
# with the session. An idle Ray with Serve takes ~0.25 of a core here (measured): a cluster left
# idle beside other tests was time taken from them. (`make test` runs the unit and model tiers in a
# second process beside the Ray tier instead, where they fill the cores it leaves idle: run_tiers.sh.)
_ORDER = ("tests/unit/", "tests/model/", "tests/ray/test_multinode.py", "tests/ray/")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        try:
            path = item.path.relative_to(REPO).as_posix()
        except ValueError:  # a test file given from outside the checkout: last
            return len(_ORDER)
        return next((i for i, prefix in enumerate(_ORDER) if path.startswith(prefix)), len(_ORDER))

    items.sort(key=rank)  # stable: each module keeps its own order
