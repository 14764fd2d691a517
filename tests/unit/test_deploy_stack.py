"""One torch / FBGEMM / TorchRec stack per cluster: every node type of cluster.yaml, both KubeRay node images and
pyproject's extras pin the same releases; GPU nodes take the CUDA builds, the others the CPU builds, and no node
installs both fbgemm wheels. Reads the files with deploy's parsers (tests/unit/test_deploy.py); no network."""

import re

import pytest

from tests.unit import test_deploy as deploy

pytestmark = pytest.mark.unit


def _node_stacks() -> dict[str, tuple[str, ...]]:
    """Where torch/fbgemm/torchrec get installed -> (torch, fbgemm wheel, fbgemm, torchrec) pins, index URL of torch."""
    sources = {
        f"cluster.yaml {t}": deploy._pip_installs(deploy._setup_commands(t))
        for t in deploy._cluster_yaml()["available_node_types"]
    }
    for flavor in ("cpu", "gpu"):
        sources[f"Dockerfile.{flavor}"] = deploy._pip_installs(
            deploy._dockerfile(deploy.KUBERAY / f"Dockerfile.{flavor}")[1]
        )
    makefile_torchrec = re.findall(r"--no-deps torchrec==(\S+)", (deploy.REPO / "Makefile").read_text())
    for extra in ("cpu", "gpu"):  # pyproject's extras; torchrec comes from the Makefile's --no-deps line
        pins = " ".join(deploy._pyproject()["project"]["optional-dependencies"][extra])
        sources[f"pyproject [{extra}]"] = [pins.split(), ["--no-deps", *(f"torchrec=={v}" for v in makefile_torchrec)]]
    stacks = {}
    for where, installs in sources.items():
        reqs = deploy._requirements(installs)
        fbgemm = sorted({deploy._name(r) for r in reqs} & {"fbgemm-gpu", "fbgemm-gpu-cpu"})
        assert len(fbgemm) == 1, f"{where}: exactly one of fbgemm-gpu / fbgemm-gpu-cpu, got {fbgemm}"
        torch_index = next((index for r, (index, _) in reqs.items() if deploy._name(r) == "torch"), None)
        stacks[where] = (
            deploy._pin(reqs, "torch"),
            fbgemm[0],
            deploy._pin(reqs, fbgemm[0]),
            deploy._pin(reqs, "torchrec"),
            torch_index,
        )
    return stacks


def test_one_stack_per_cluster_every_node_type_pins_the_same_torch_fbgemm_torchrec():
    """Plans, checkpoints and pickled objects cross node types, so every node runs the same torch, FBGEMM and
    TorchRec release (major.minor.patch); GPU nodes take the CUDA builds, the others the CPU builds, never both
    fbgemm wheels on one node (they install the same fbgemm_gpu package)."""
    stacks = _node_stacks()
    assert {"cluster.yaml ray.worker.gpu", "cluster.yaml ray.worker.cpu", "Dockerfile.gpu", "pyproject [gpu]"} <= set(
        stacks
    )
    versions = {where: (torch, fbgemm, torchrec) for where, (torch, _, fbgemm, torchrec, _) in stacks.items()}
    assert len(set(versions.values())) == 1, f"more than one torch/fbgemm/torchrec stack: {versions}"
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in next(iter(versions.values()))), versions
    for where, (_, wheel, _, _, index) in stacks.items():
        gpu = "gpu" in where.split()[-1]  # ray.worker.gpu, Dockerfile.gpu, [gpu]
        assert wheel == ("fbgemm-gpu" if gpu else "fbgemm-gpu-cpu"), where
        if index is not None:  # the matching PyTorch index: a CUDA build with the CUDA FBGEMM, CPU with CPU
            assert re.search(r"/whl/cu\d+$" if gpu else r"/whl/cpu$", index), (where, index)
    assert all(index is not None for where, (*_, index) in stacks.items() if not where.startswith("pyproject"))


def test_the_one_stack_check_catches_a_second_stack(monkeypatch):
    real = deploy._setup_commands

    def older_gpu(node_type):
        lines = real(node_type)
        return [re.sub(r"torch==\S+", "torch==2.0.0", ln) for ln in lines] if node_type == "ray.worker.gpu" else lines

    monkeypatch.setattr(deploy, "_setup_commands", older_gpu)
    with pytest.raises(AssertionError, match="more than one torch/fbgemm/torchrec stack"):
        test_one_stack_per_cluster_every_node_type_pins_the_same_torch_fbgemm_torchrec()

    def both(node_type):
        return [*real(node_type), "pip install fbgemm-gpu-cpu"] if node_type == "ray.worker.gpu" else real(node_type)

    monkeypatch.setattr(deploy, "_setup_commands", both)
    with pytest.raises(AssertionError, match="exactly one of fbgemm"):
        _node_stacks()
