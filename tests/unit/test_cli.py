import argparse
import json

import pytest
import torch
import yaml

from jobs.cli import build_parser, main

pytestmark = pytest.mark.unit

# The CLI is part of the product: changing it is a decision, so this list changes with it.
FROZEN = {
    "experiment": {
        "--dataset", "--data", "--mapping", "--data-dir", "--config", "--quick", "--seeds",
        "--fm-delay", "--variants", "--out", "--no-progress", "--sweep",
    },
    "plan": {
        "--fm-params", "--tables", "--gpus", "--hbm-gb", "--ddr-gb", "--ssd-gb", "--local-world-size",
        "--embedding-dim", "--json",
    },
    "augment": {
        "--address", "--attribution-s", "--batch-size", "--group", "--labels", "--storage", "--stream", "--windows",
        "--workers", "--unit-rows",
    },
    "fm": set(),
    "fm start": {"--address", "--name", "--replicas", "--sharding", "--shards", "--storage", "--version"},
    "fm status": {"--address", "--json", "--name", "--storage"},
    "fm stop": {"--address", "--json", "--name", "--storage"},
    "fm switch": {"--address", "--name", "--storage", "--version"},
    "fm train": {
        "--address", "--follow", "--name", "--retrain", "--sharding", "--size", "--storage", "--stream",
        "--through-window", "--workers",
    },
    "stream": {"--data", "--data-dir", "--dataset", "--mapping", "--out", "--rows-per-window", "--windows"},
    "serve": {"--config", "--store", "--host", "--port", "--address", "--demo"},
    "bench serve": {
        "--json", "--config", "--requests", "--seconds", "--concurrency", "--rows", "--tenants", "--loopfm-entities",
    },
    "bench fm": {"--json", "--rows", "--fm-size"},
    "bench das": {"--json", "--rows", "--fm-size", "--shards"},
    "bench train": {"--json", "--rows-per-window", "--windows"},
    "bench guard": {"--json", "--rows-per-window", "--windows"},
    "bench tenants": {
        "--json", "--counts", "--rows-per-window", "--max-concurrent", "--tenants-per-run", "--idle-seconds", "--serve",
        "--no-serve", "--plot",
    },
    "bench scale": {"--json", "--rows", "--fm-size", "--workers", "--train", "--no-train", "--das-repeats", "--plot"},
    "tenants": set(),
    "tenants add": {"--address", "--config", "--replace", "--storage", "--stream"},
    "tenants list": {"--address", "--json", "--storage"},
    "tenants remove": {"--address", "--storage"},
    "run": {
        "--dataset", "--data", "--mapping", "--data-dir", "--windows", "--rows-per-window", "--tenants", "--config",
        "--storage", "--address", "--exit",
    },
    "train": {"--address", "--follow", "--max-concurrent", "--no-progress", "--out", "--storage", "--tenants-per-run",
              "--windows", "--young-fm-wait"},
}  # fmt: skip


def _options(parser, prefix: str = "") -> dict[str, set[str]]:
    """Options of every (sub-)command, keyed by its words, e.g. 'bench serve'."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                words = f"{prefix} {name}".strip()
                found[words] = {o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
                found.update(_options(p, words))
    return found


def test_cli_options_are_frozen():
    options = _options(build_parser())
    assert set(options) == set(FROZEN) | {"bench"}
    for command, expected in FROZEN.items():
        assert options[command] == expected, command


def test_experiment_runs_from_a_config_file(tmp_path, capsys):
    cfg = {
        "source": {"synthetic": {"num_windows": 3, "rows_per_window": 800, "num_tenants": 2, "num_users": 100}},
        "fm": {"size": 1, "epochs_per_window": 1},
        "variants": ["vm_only", "ah"],
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["experiment", "--config", str(tmp_path / "cfg.yaml"), "--seeds", "1", "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| ah |" in out and "results.json" in out
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["seeds"] == 1 and {"fm", "vm_only", "ah", "base_rate", "fm_headroom"} == {
        v for v, s in data["summary"].items() if isinstance(s, dict)
    }
    # the kernels the FM trained with travel with the figures (they move the FM's labels)
    assert data["machine"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert data["machine"]["torch"] == torch.__version__
    assert f"CPU kernels {torch.backends.cpu.get_cpu_capability()}" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experiment", "--data", "nope.csv", "--mapping", "nope.yaml"], "data_path"),
        (["experiment", "--variants", "vm_only,wizard"], "variants"),
        (["experiment", "--seeds", "0"], "seeds"),
    ],
)
def test_user_errors_print_one_line_without_traceback(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("exfm experiment: error:")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--store", "{tmp}/empty"], "no published student"),
        (["serve", "--store", "{tmp}", "--port", "70000"], "port"),
        (["serve", "--config", "{tmp}/missing.yaml"], "no such file"),
        (["bench", "serve", "--rows", "0"], "--rows"),
        (["train", "--windows", "0:3", "--storage", "{tmp}", "--young-fm-wait", "1000"], "--young-fm-wait"),
    ],
)
def test_serve_and_bench_user_errors_exit_2_before_starting_ray(argv, message, capsys, tmp_path):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_mapping_key_is_named(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("is_click,t,user\n1,10,a\n0,11,b\n")
    (tmp_path / "m.yaml").write_text("label: is_click\ntime: t\ncategorical: [user]\nwindowz: 2\n")
    code = main(["experiment", "--data", str(tmp_path / "log.csv"), "--mapping", str(tmp_path / "m.yaml")])
    assert code == 2
    assert "windowz" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "words"),
    [
        ("jobs.pipeline", ["run", "--exit"]),
        ("jobs.train_tenants", ["train"]),
        ("jobs.augment", ["augment"]),
        ("jobs.train_fm", ["fm", "train"]),
    ],
)
def test_ray_job_entry_points_are_the_cli(module, words, monkeypatch):
    """`ray job submit -- python -m jobs.X ARGS` runs `exfm WORDS ARGS`: the README's cluster commands."""
    import runpy
    import sys

    seen = []
    monkeypatch.setattr("jobs.cli.main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [module, "--storage", "/mnt/exfm/store"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__")
    assert exit_.value.code == 0 and seen == [[*words, "--storage", "/mnt/exfm/store"]]


def test_rays_expected_notices_stay_out_of_the_console_and_the_rest_shows(capfd):
    from ray._private import worker

    from jobs.cluster import _quiet_ray_console

    _quiet_ray_console(serve=False)
    _quiet_ray_console(serve=False)  # idempotent: one filter, not a chain
    notice = "WARNING: 24 PYTHON worker processes have been started on node: abc, which is 12x the maximum"
    worker.print_to_stdstream({"lines": [notice, "a raylet error a user must see"], "pid": "raylet",
                               "is_err": True}, ignore_prefix=False)  # fmt: skip
    err = capfd.readouterr().err
    assert "a raylet error a user must see" in err and "PYTHON worker processes" not in err


def test_the_cli_and_the_tenant_manager_import_without_torch():
    """`exfm --help`, `exfm tenants ...`, `exfm fm status/stop` and the tenant manager actor read
    configs and metadata only: importing torch/torchrec made each such process ~10 s slower here."""
    import subprocess
    import sys

    code = (
        "import sys, jobs.cli, jobs.tenants_cmd, jobs.fm_cmd, actors.launch, actors.tenant_manager, "
        "exfm_ray.students.store, exfm_ray.tenants.status; print(sorted({'torch', 'torchrec'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
