"""Named experiment recipes: the quick form (make demo, CI-sized) and the full form per dataset."""

from __future__ import annotations

from pathlib import Path

from exfm_ray.data.presets import STREAMS, preset
from exfm_ray.data.sources import SourceConfig
from exfm_ray.data.synthetic import SyntheticConfig
from exfm_ray.errors import ConfigError
from exfm_ray.experiment.config import ExperimentConfig
from exfm_ray.students.config import StudentConfig

DATASETS = (*STREAMS, "byo")

# Student learning rates are tuned for the vm_only baseline of each dataset (the strongest
# baseline we can give it), never for the distilled variants; see docs/results.md.
STUDENT_BY_DATASET = {"movielens": StudentConfig(lr=0.01)}


def experiment_recipe(
    dataset: str,
    *,
    quick: bool = False,
    data_dir: Path | None = None,
    data_path: Path | None = None,
    mapping_path: Path | None = None,
) -> ExperimentConfig:
    """`dataset` is a named stream (data/presets.py) or byo (with data_path and mapping_path)."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {list(DATASETS)}")
    source: dict = {"dataset": "byo"} if dataset == "byo" else preset(dataset)
    source.update(data_dir=data_dir, data_path=data_path, mapping_path=mapping_path)
    if dataset == "synthetic":
        source["synthetic"] = SyntheticConfig(num_windows=8 if quick else 12)
    elif quick and source["dataset"] == "synthetic":
        source["synthetic"] = {**source["synthetic"], "num_windows": 6}
    return ExperimentConfig(
        source=SourceConfig.parse(source),
        student=STUDENT_BY_DATASET.get(source["dataset"], StudentConfig()),
        seeds=3 if quick else 5,
    )
