"""Deployment files: cluster.yaml passes Ray's own validation (no cloud calls), and the KubeRay manifests in
deploy/kuberay agree with it (node types, custom resources, Ray version, pins) and with deploy/serve_config.yaml.
Nothing here starts Ray or reaches a network."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
STORE = "/mnt/exfm/store"

# manifest -> (apiVersion, kind); a manifest added without a line here fails the parse test.
MANIFESTS = {
    "storage.yaml": ("v1", "PersistentVolumeClaim"),
    "raycluster.yaml": ("ray.io/v1", "RayCluster"),
    "rayjob-pipeline.yaml": ("ray.io/v1", "RayJob"),
    "rayjob-train-tenants.yaml": ("ray.io/v1", "RayJob"),
    "rayservice-students.yaml": ("ray.io/v1", "RayService"),
}
# RayCluster worker group -> cluster.yaml node type.
GROUPS = {"gpu": "ray.worker.gpu", "cpu": "ray.worker.cpu", "serve": "ray.worker.serve"}
CUSTOM_RESOURCES = {"fm_shard", "student_pool", "serve_pool"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # KubeRay rejects other RayCluster/RayJob/RayService names


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
    assert "fbgemm-gpu==" in gpu_setup and "fbgemm-gpu-cpu" not in gpu_setup  # never both
    assert "--no-deps torchrec" in gpu_setup


def test_cluster_yaml_with_a_typo_is_rejected_by_the_same_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["ray.worker.cpu"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(config))


# ---- helpers: read the files the way their consumers do ----


def _cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _manifest(name: str) -> dict:
    (doc,) = yaml.safe_load_all((KUBERAY / name).read_text())
    return doc


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def _pod_templates(cluster_spec: dict) -> dict[str, dict]:
    """'head' and each worker group name -> its pod spec."""
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _custom_resources(ray_start_params: dict) -> dict:
    """rayStartParams.resources as `ray start --resources` receives it: KubeRay puts the string on a shell line."""
    value = ray_start_params.get("resources")
    if value is None:
        return {}
    (argument,) = shlex.split(value)
    return json.loads(argument)


def _shell_commands(line: str) -> list[list[str]]:
    """A shell line split into its simple commands (at &&, ;, ||, |), each as the argument list the shell builds."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";", "||", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def _pip_installs(lines: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in these shell lines."""
    return [cmd[2:] for line in lines for cmd in _shell_commands(line) if cmd[:2] == ["pip", "install"]]


def _requirements(installs: list[list[str]]) -> dict[str, tuple[str | None, bool]]:
    """requirement -> (index URL, --no-deps) over all installs; the project itself (`-e DIR`) is '<project>'."""
    found = {}
    for args in installs:
        index, no_deps, names = None, "--no-deps" in args, []
        it = iter(args)
        for arg in it:
            if arg in ("--index-url", "-i"):
                index = next(it)
            elif arg == "-e":
                next(it)
                names.append("<project>")
            elif not arg.startswith("-"):
                names.append(arg)
        for name in names:
            assert name not in found, f"{name} installed twice"
            found[name] = (index, no_deps)
    return found


def _dockerfile(path: Path) -> tuple[str, list[str]]:
    """(FROM image, RUN shell lines) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", "", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    return base, re.findall(r"^RUN\s+(.*)$", text, flags=re.M)


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pin(requirements, name: str) -> str | None:
    for req in requirements:
        if _name(req) == name:
            return req.split("==", 1)[1] if "==" in req else None
    return None


def _stack_problems(installs: list[list[str]]) -> list[str]:
    """What stack-notes.md section 1 forbids in one image's pip installs."""
    reqs = _requirements(installs)
    names = {_name(r): r for r in reqs}
    problems = []
    fbgemm = sorted(n for n in names if n in ("fbgemm-gpu", "fbgemm-gpu-cpu"))
    if len(fbgemm) != 1:
        problems.append(f"exactly one of fbgemm-gpu / fbgemm-gpu-cpu, got {fbgemm}")
    for pkg in ("torch", "torchrec", *fbgemm):
        if _pin(reqs, pkg) is None:
            problems.append(f"{pkg} is not pinned with ==")
    if "torchrec" in names and not reqs[names["torchrec"]][1]:
        problems.append("torchrec without --no-deps")
    versions = [_pin(reqs, p) for p in ("torch", *fbgemm, "torchrec")]
    if len(fbgemm) == 1 and None not in versions:
        torch_minor, fbgemm_minor, torchrec_minor = (int(v.split(".")[1]) for v in versions)
        if not (fbgemm_minor == torchrec_minor and torch_minor == fbgemm_minor + 5):
            problems.append(f"FBGEMM/TorchRec 1.N must pair with PyTorch 2.(N+5): {versions}")
    return problems


def _node_type_for(pod: str) -> str:
    return _cluster_yaml()["head_node_type"] if pod == "head" else GROUPS[pod]


def _setup_commands(node_type: str) -> list[str]:
    """What `ray up` runs on a node of this type: setup_commands, then the head's or the type's worker commands."""
    config = _cluster_yaml()
    if node_type == config["head_node_type"]:
        return config.get("setup_commands", []) + config["head_setup_commands"]
    return config.get("setup_commands", []) + config["available_node_types"][node_type]["worker_setup_commands"]


def _base_image(node_type: str) -> str:
    """The image `ray up` runs a node type in: docker.image, unless head_image/worker_image override it."""
    config = _cluster_yaml()
    docker = config["docker"]
    if node_type == config["head_node_type"]:
        return docker.get("head_image", docker["image"])
    node_docker = config["available_node_types"][node_type].get("docker", {})
    return node_docker.get("worker_image", docker.get("worker_image", docker["image"]))


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_requirement() -> str:
    (ray,) = [d for d in _pyproject()["project"]["dependencies"] if _name(d) == "ray"]
    return ray


def _ray_version() -> str:
    return _ray_requirement().split("==")[1]


def _image_dockerfile(image: str) -> Path:
    """exfm-ray:<project version>-<flavor> -> deploy/kuberay/Dockerfile.<flavor>."""
    match = re.fullmatch(r"exfm-ray:(?P<version>[^-]+)-(?P<flavor>cpu|gpu)", image)
    assert match, f"{image}: not an exfm-ray image built from deploy/kuberay"
    assert match["version"] == _pyproject()["project"]["version"]
    return KUBERAY / f"Dockerfile.{match['flavor']}"


# ---- the KubeRay manifests ----


def test_every_kuberay_manifest_parses_with_its_api_version_and_kind():
    assert {p.name for p in KUBERAY.glob("*.yaml")} == set(MANIFESTS)
    for name, (api_version, kind) in MANIFESTS.items():
        doc = _manifest(name)
        assert (doc["apiVersion"], doc["kind"]) == (api_version, kind), name
        assert DNS1035.match(doc["metadata"]["name"]), name
    assert _manifest("raycluster.yaml")["metadata"]["name"] == "exfm-ray"


def test_raycluster_worker_groups_mirror_cluster_yaml_node_types():
    config = _cluster_yaml()
    spec = _manifest("raycluster.yaml")["spec"]
    assert spec["rayVersion"] == _ray_version() == "2.60.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(GROUPS) and len(groups) == len(spec["workerGroupSpecs"])
    for name, node_type in GROUPS.items():
        group, node = groups[name], config["available_node_types"][node_type]
        advertised = _custom_resources(group["rayStartParams"])
        assert advertised == {k: v for k, v in node["resources"].items() if k in CUSTOM_RESOURCES}, name
        assert advertised, f"{name} advertises no custom resource"
        assert "labels" not in group["rayStartParams"]  # KubeRay rejects it there
        assert (group["minReplicas"], group["maxReplicas"]) == (node["min_workers"], node["max_workers"]), name
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
    assert sum(g["maxReplicas"] for g in groups.values()) == config["max_workers"]
    head_node = config["available_node_types"][config["head_node_type"]]
    assert float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) == head_node["resources"]["CPU"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == config["idle_timeout_minutes"] * 60


def test_only_the_gpu_group_asks_for_gpus_one_per_fm_shard():
    pods = _pod_templates(_manifest("raycluster.yaml")["spec"])
    gpu = pods["gpu"]["containers"][0]["resources"]
    fm_shards = _cluster_yaml()["available_node_types"]["ray.worker.gpu"]["resources"]["fm_shard"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) == int(gpu["requests"]["nvidia.com/gpu"]) == fm_shards == 8
    assert pods["gpu"]["containers"][0]["image"].endswith("-gpu")
    for name, pod in pods.items():
        if name != "gpu":
            assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {}), name
            assert pod["containers"][0]["image"].endswith("-cpu"), name


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayservice-students.yaml"])
def test_every_ray_pod_mounts_the_shared_store_and_sets_exfm_storage(manifest, monkeypatch):
    from jobs.settings import Settings

    pods = _pod_templates(_ray_cluster_spec(_manifest(manifest)))
    for name, pod in pods.items():
        volumes = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims.get(mounts.get(STORE)) == "exfm-store", f"{manifest} {name}: {STORE} is not the exfm-store claim"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EXFM_STORAGE"] == STORE, f"{manifest} {name}"
        monkeypatch.setenv("EXFM_STORAGE", env["EXFM_STORAGE"])
        assert Settings().storage == Path(STORE)  # the variable jobs/settings.py reads


def test_the_store_claim_is_read_write_many():
    pvc = _manifest("storage.yaml")
    assert pvc["metadata"]["name"] == "exfm-store"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes and reads it


def test_every_pod_runs_an_image_built_from_cluster_yamls_base_image_with_its_pins():
    """Per pod: its image's Dockerfile starts FROM the image cluster.yaml gives that node type and pip-installs the
    same requirements (versions, index URLs, --no-deps) as that node type's setup commands, plus pyproject's ray."""
    pods = _pod_templates(_manifest("raycluster.yaml")["spec"])
    for pod_name, pod in pods.items():
        node_type = _node_type_for(pod_name)
        dockerfile = _image_dockerfile(pod["containers"][0]["image"])
        base, runs = _dockerfile(dockerfile)
        assert base == _base_image(node_type), f"{pod_name}: {dockerfile.name} FROM {base}"
        assert base.split(":")[1].startswith(_ray_version() + "-"), base
        image_reqs = _requirements(_pip_installs(runs))
        assert image_reqs.pop(_ray_requirement()) == (None, False), "pyproject's ray extras, from PyPI"
        assert image_reqs == _requirements(_pip_installs(_setup_commands(node_type))), f"{pod_name}: {dockerfile.name}"


@pytest.mark.parametrize("flavor,fbgemm", [("cpu", "fbgemm-gpu-cpu"), ("gpu", "fbgemm-gpu")])
def test_dockerfiles_follow_the_stack_rules(flavor, fbgemm):
    base, runs = _dockerfile(KUBERAY / f"Dockerfile.{flavor}")
    assert base.endswith(f"-{flavor}")
    installs = _pip_installs(runs)
    assert _stack_problems(installs) == []
    assert {_name(r) for r in _requirements(installs)} & {"fbgemm-gpu", "fbgemm-gpu-cpu"} == {fbgemm}
    assert (KUBERAY / f"Dockerfile.{flavor}.dockerignore").read_text().count(".venv") == 1  # COPY . stays small


def test_stack_rules_catch_a_bad_image():
    bad = [
        "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install fbgemm-gpu-cpu==1.8.0",
        "pip install fbgemm-gpu==1.6.0 && pip install torchrec==1.8.0",
    ]
    problems = _stack_problems(_pip_installs(bad))
    assert any("exactly one of fbgemm" in p for p in problems)
    assert any(p.startswith("torch is not pinned") for p in problems)
    assert "torchrec without --no-deps" in problems
    mispaired = ["pip install torch==2.13.0 fbgemm-gpu-cpu==1.6.0 && pip install --no-deps torchrec==1.6.1"]
    assert any("must pair" in p for p in _stack_problems(_pip_installs(mispaired)))


@pytest.mark.parametrize(
    "manifest,entrypoint",
    [
        ("rayjob-pipeline.yaml", "python -m jobs.pipeline --storage /mnt/exfm/store"),
        ("rayjob-train-tenants.yaml", "python -m jobs.train_tenants --windows 0:7 --storage /mnt/exfm/store"),
    ],
)
def test_rayjobs_run_on_the_existing_cluster(manifest, entrypoint):
    spec = _manifest(manifest)["spec"]
    assert spec["entrypoint"] == entrypoint
    assert spec["clusterSelector"] == {"ray.io/cluster": _manifest("raycluster.yaml")["metadata"]["name"]}
    assert "rayClusterSpec" not in spec
    assert spec["suspend"] is False  # KubeRay rejects suspend with clusterSelector
    assert "pip" not in spec.get("runtimeEnvYAML", "")  # the stack is in the image, never per job
    assert spec.get("backoffLimit", 0) == 0  # KubeRay rejects retries with clusterSelector


def test_rayservice_serve_config_is_deploy_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from exfm_ray.serving.app import app_builder

    local = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    spec = _manifest("rayservice-students.yaml")["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    v2 = yaml.safe_load(spec["serveConfigV2"])
    assert v2["applications"] == local["applications"]
    assert v2["applications"][0]["args"]["store_root"] == STORE
    assert set(v2) == set(local)
    assert (v2["proxy_location"], v2["logging_config"]) == (local["proxy_location"], local["logging_config"])
    # The one intended difference: KubeRay's Service reaches the ingress on the pod IP, not on loopback.
    assert v2["http_options"] == {**local["http_options"], "host": "0.0.0.0"}
    app = ServeDeploySchema.model_validate(v2).applications[0]
    assert app_builder(app.args) is not None  # args validate into a ServeConfig; nothing starts


def test_rayservice_cluster_has_serve_workers_with_the_fast_ingress_settings():
    from jobs.cluster import FAST_INGRESS_ENV

    spec = _ray_cluster_spec(_manifest("rayservice-students.yaml"))
    assert spec["rayVersion"] == _ray_version()
    (group,) = spec["workerGroupSpecs"]
    node = _cluster_yaml()["available_node_types"]["ray.worker.serve"]
    assert group["groupName"] == "serve"
    assert _custom_resources(group["rayStartParams"]) == {"serve_pool": node["resources"]["serve_pool"]}
    assert (group["minReplicas"], group["maxReplicas"]) == (node["min_workers"], node["max_workers"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to the serve group
    for name, pod in _pod_templates(spec).items():
        container = pod["containers"][0]
        assert _image_dockerfile(container["image"]).name == "Dockerfile.cpu", name
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")} == FAST_INGRESS_ENV, name


def test_kuberay_readme_commands_name_the_files_that_exist():
    readme = (KUBERAY / "README.md").read_text()
    for path in re.findall(r"deploy/kuberay/([\w.-]+)", readme):
        assert (KUBERAY / path).exists(), path
    for name in ("raycluster.yaml", "rayjob-pipeline.yaml", "rayservice-students.yaml", "Dockerfile.gpu"):
        assert f"deploy/kuberay/{name}" in readme
