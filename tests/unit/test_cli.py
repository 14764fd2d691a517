import json

import pytest
import yaml

from jobs.cli import build_parser, main

pytestmark = pytest.mark.unit

# The CLI is part of the product: changing it is a decision, so this list changes with it.
FROZEN = {
    "experiment": {
        "--dataset", "--data", "--mapping", "--data-dir", "--config", "--quick", "--seeds",
        "--fm-delay", "--variants", "--out", "--no-progress",
    },
    "plan": {
        "--fm-params", "--tables", "--gpus", "--hbm-gb", "--ddr-gb", "--local-world-size", "--embedding-dim",
        "--json",
    },
}  # fmt: skip


def _options(parser) -> dict[str, set[str]]:
    sub = next(a for a in parser._actions if a.dest == "command")
    return {
        name: {o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        for name, p in sub.choices.items()
    }


def test_cli_options_are_frozen():
    options = _options(build_parser())
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
    assert data["seeds"] == 1 and set(data["summary"]) == {"fm", "vm_only", "ah"}


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


def test_bad_mapping_key_is_named(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("is_click,t,user\n1,10,a\n0,11,b\n")
    (tmp_path / "m.yaml").write_text("label: is_click\ntime: t\ncategorical: [user]\nwindowz: 2\n")
    code = main(["experiment", "--data", str(tmp_path / "log.csv"), "--mapping", str(tmp_path / "m.yaml")])
    assert code == 2
    assert "windowz" in capsys.readouterr().err
