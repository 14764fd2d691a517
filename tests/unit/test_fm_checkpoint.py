"""FM checkpoints (DCP) load weights only: a `.metadata` file written into shared storage by
anyone must not run code in the process that loads the FM."""

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.config import FMConfig
from exfm_ray.fm.model import build_fm
from exfm_ray.fm.sharding import SafeFileSystemReader, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.unit


class _Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    spec = SyntheticStream(SyntheticConfig(num_windows=2, rows_per_window=100, num_tenants=2)).stream().spec
    torch.manual_seed(0)
    fm = build_fm(spec, FMConfig())
    path = tmp_path_factory.mktemp("fm") / "fm-0001"
    save_checkpoint(fm, path)
    return spec, fm, path


def _metadata(path):
    return SafeFileSystemReader(str(path)).read_metadata()


def test_a_checkpoint_loads_back_exactly(saved):
    spec, fm, path = saved
    torch.manual_seed(1)
    other = build_fm(spec, FMConfig())
    load_checkpoint(other, path)
    for (name, a), b in zip(fm.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_metadata_that_would_run_code_is_refused(saved, tmp_path):
    spec, _, path = saved
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in path.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran"
    (evil / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec: refused"):
        load_checkpoint(build_fm(spec, FMConfig()), evil)
    assert not marker.exists()
    # what this guards against: torch's own reader runs it (if this fails, torch fixed it upstream)
    with pytest.raises(BaseException):  # noqa: B017 - DCP's CheckpointException: the payload is not Metadata
        dcp.load(build_fm(spec, FMConfig()).state_dict(), checkpoint_id=str(evil))
    assert marker.exists()


def test_non_tensor_entries_are_refused(saved, tmp_path):
    """DCP loads non-tensor entries with torch.load(weights_only=False); the FM has none."""
    spec, _, path = saved
    forged = tmp_path / "forged"
    forged.mkdir()
    for f in path.iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    metadata = _metadata(path)
    key = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    (forged / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(pickle.UnpicklingError, match="BytesStorageMetadata: refused"):
        load_checkpoint(build_fm(spec, FMConfig()), forged)
