"""Deployment files: cluster.yaml passes Ray's own validation (no cloud calls)."""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema error
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types["ray.worker.gpu"]["resources"]["fm_shard"] == 8
    assert types["ray.worker.cpu"]["resources"]["student_pool"] > 0
    assert types["ray.worker.serve"]["resources"]["serve_pool"] > 0
    gpu_setup = " ".join(types["ray.worker.gpu"]["worker_setup_commands"])
    assert "fbgemm-gpu==1.6.0" in gpu_setup and "fbgemm-gpu-cpu" not in gpu_setup  # never both
    assert "--no-deps torchrec" in gpu_setup


def test_cluster_yaml_with_a_typo_is_rejected_by_the_same_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["ray.worker.cpu"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(config))
