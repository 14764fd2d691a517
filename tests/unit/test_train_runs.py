"""Our Ray Train runs start no dataset actor they would never use (exfm_ray/train_runs.py)."""

import pytest

pytestmark = pytest.mark.unit


def _names(trainer) -> list[str]:
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_a_run_without_datasets_starts_no_dataset_manager_and_keeps_every_other_callback():
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from exfm_ray.train_runs import torch_trainer

    def loop():
        pass

    run = RunConfig(name="probe", storage_path="/tmp/exfm-train-runs-probe")
    ray_default = _names(TorchTrainer(loop, run_config=run))
    assert "DatasetsCallback" in ray_default  # what Ray 2.60 adds to every run: the reason for torch_trainer
    ours = _names(torch_trainer(loop, run_config=run))
    assert ours == [n for n in ray_default if n != "DatasetsCallback"]
    assert "PlacementGroupCleanerCallback" in ours  # Ray's own clean-up stays
    with_data = torch_trainer(loop, run_config=run, datasets={"train": lambda: None})  # made lazily
    assert _names(with_data) == ray_default  # a run that hands out datasets keeps its manager
