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
