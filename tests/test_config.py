import copy

import pytest
import yaml

from qtraj.config import (
    ConfigError,
    checkpoints_of,
    load_config,
    make_schedule,
    quant_spec,
    run_settings,
    validate_config,
)
from tests.conftest import REPO_ROOT

DEFAULT = REPO_ROOT / "config" / "config.yaml"


@pytest.fixture
def default_config():
    return yaml.safe_load(DEFAULT.read_text())


def test_default_config_is_valid_and_has_the_issue_grid():
    config = load_config(DEFAULT)
    settings = {run: run_settings(config, run) for run in config["runs"]}
    assert {run["schedule"] for run in settings.values()} == {"wsd"}
    assert len({(run["peak_lr"], run["steps"], run["batch_size"]) for run in settings.values()}) == 1  # equal tokens
    assert sorted(run["seed"] for run in settings.values()) == [0, 1, 2]
    # the science check: WSD at >= 8 checkpoints under three seeds, each with a LAWA average at its end and a
    # constant-LR control: the run continued at a constant LR from its decay start to its last step
    assert all(len(checkpoints_of(config, run)) >= 8 for run in settings)
    controls = {spec["from"]: spec for spec in config["cooldowns"].values() if spec["shape"] == "constant"}
    assert controls.keys() == settings.keys()
    for run, spec in controls.items():
        schedule = make_schedule(settings[run])
        assert spec["at"] == [schedule.decay_start] and schedule.decay_start + spec["length"] == settings[run]["steps"]
    assert len(config["averages"]) == len(settings)
    # each control's checkpoint lines up with its run's last one (equal steps, so equal tokens)
    ends = {spec["from"]: checkpoints_of(config, name)[-1] for name, spec in config["cooldowns"].items()}
    assert all(ends[run] == checkpoints_of(config, run)[-1] for run in settings)
    grid = {(entry["method"], entry["bits"]) for entry in config["quantizations"].values()}
    assert grid >= {("rtn", 3), ("rtn", 4), ("gptq", 3), ("gptq", 4)}
    assert config["accuracy"]["local_tasks"]


def test_every_method_runs_in_the_methods_experiment():
    config = load_config(REPO_ROOT / "config" / "experiments" / "methods.yaml")
    grid = {(entry["method"], entry["bits"]) for entry in config["quantizations"].values()}
    assert grid >= {("rtn", 3), ("rtn", 4), ("gptq", 3), ("gptq", 4), ("awq", 3), ("awq", 4), ("bnb", 8), ("bnb", 4)}


def test_tiny_test_config_is_valid():
    load_config(REPO_ROOT / "tests" / "configs" / "tiny.yaml")


def test_defaults_are_filled_in(default_config):
    del default_config["evaluation"]["batch_size"]
    config = validate_config(default_config)
    assert config["evaluation"]["batch_size"] == 32
    assert quant_spec(config, "gptq-w3g32")["options"]["actorder"] == "static"


def test_bad_schedule_names_the_key_and_the_allowed_values(default_config):
    default_config["runs"]["wsd"]["schedule"] = "wsdd"
    with pytest.raises(ConfigError) as error:
        validate_config(default_config)
    assert "runs.wsd.schedule" in str(error.value)
    assert "'cosine', 'wsd', 'linear', 'constant'" in str(error.value)


def test_unknown_method_lists_the_known_ones(default_config):
    default_config["quantizations"]["awq-w4"] = {"method": "awq-typo", "bits": 4}
    with pytest.raises(ConfigError, match=r"quantizations.awq-w4.method.*known methods: awq, bnb, gptq, rtn"):
        validate_config(default_config)


def test_unsupported_bits_and_unknown_option_are_refused(default_config):
    bad_bits = copy.deepcopy(default_config)
    bad_bits["quantizations"]["gptq-w3g32"]["bits"] = 5
    with pytest.raises(ConfigError, match=r"quantizations.gptq-w3g32'.*supports bits \[2, 3, 4, 8\], not 5"):
        validate_config(bad_bits)
    default_config["quantizations"]["gptq-w3g32"]["options"] = {"damp": 0.1}
    with pytest.raises(ConfigError, match=r"quantizations.gptq-w3g32.options.*known keys: actorder"):
        validate_config(default_config)


def test_unknown_top_level_key_and_bad_run_override(default_config):
    broken = copy.deepcopy(default_config)
    broken["trainig"] = {}
    with pytest.raises(ConfigError, match="known keys"):
        validate_config(broken)
    default_config["runs"]["wsd-seed1"]["peak_lr"] = -1
    with pytest.raises(ConfigError, match="runs.wsd-seed1.peak_lr"):
        validate_config(default_config)


def test_malformed_yaml_is_reported(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("runs: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_bitsandbytes_group_size_is_fixed_by_the_library(default_config):
    default_config["quantizations"]["bnb-nf4"] = {"method": "bnb", "bits": 4, "group_size": 32}
    with pytest.raises(ConfigError, match="group_size 64 .fixed by the library"):
        validate_config(default_config)
    default_config["quantizations"]["bnb-nf4"]["group_size"] = 64
    validate_config(default_config)


def test_engine_is_a_dimension_with_a_default(default_config):
    default_config["quantizations"]["gptq-w3g32-llmc"] = {"method": "gptq", "bits": 3, "group_size": 32,
                                                          "engine": "llmcompressor"}
    config = validate_config(default_config)
    assert quant_spec(config, "gptq-w3g32")["engine"] == "llmcompressor"
    assert quant_spec(config, "gptq-w3g32-llmc")["engine"] == "llmcompressor"
    config["quantizations"]["rtn-w3g32"]["engine"] = "auto-gptq"
    with pytest.raises(ConfigError, match="rtn-w3g32'.*runs on engines llmcompressor, not 'auto-gptq'"):
        validate_config(config)


def test_true_sequential_is_a_gptqmodel_option(default_config):
    default_config["quantizations"]["gptq-w4g32"]["options"] = {"true_sequential": False}
    with pytest.raises(ConfigError, match="true_sequential needs engine: gptqmodel"):
        validate_config(copy.deepcopy(default_config))
    default_config["quantizations"]["gptq-w4g32"]["engine"] = "gptqmodel"
    validate_config(default_config)


def test_a_config_needs_runs_or_families_and_their_names_differ(default_config):
    with pytest.raises(ConfigError, match="neither `runs`.*`families`.*nor `local`"):
        validate_config({"quantizations": default_config["quantizations"]})
    default_config["families"] = {"pythia-70m": {"select": {"last": 2}}}
    config = validate_config(copy.deepcopy(default_config))
    assert checkpoints_of(config, "pythia-70m") == ["step142000", "step143000"]
    default_config["runs"]["pythia-70m"] = {}
    with pytest.raises(ConfigError, match="'pythia-70m' is both a trained run and a family"):
        validate_config(default_config)


def test_an_unknown_family_names_the_key_and_the_family_files_there(default_config, tmp_path):
    """What the workflow shows before any job (Snakemake validates the config first: tests/test_workflow.py's
    bad-config run shows that path once, for a misspelt method)."""
    (tmp_path / "tiny-a.yaml").write_text(yaml.safe_dump({"name": "Tiny A", "repo": "qtraj-test/tiny-a",
                                                          "revisions": [{"revision": "main"}]}))
    default_config.update(families_dir=str(tmp_path), families={"tiny-z": {}}, runs={})
    with pytest.raises(ConfigError, match=r"'families.tiny-z': there is no family file .*tiny-a"):
        validate_config(default_config)


def test_a_selector_that_picks_nothing_is_refused(default_config):
    default_config["families"] = {"pythia-70m": {"select": {"tokens": [1e15, None]}}}
    with pytest.raises(ConfigError, match="families.pythia-70m.select' picks no revision"):
        validate_config(default_config)


def test_building_the_dag_imports_no_torch_and_no_engine():
    """Snakemake validates the config and finds the methods while it builds the DAG, once per invocation and on
    every cluster submission: that must not pay for torch, transformers or a quantization engine."""
    import subprocess
    import sys

    code = ("import sys; from qtraj.config import load_config; from qtraj.methods import discover; "
            "import qtraj.families, qtraj.local, qtraj.resources, qtraj.checkpoints; "
            "load_config('config/config.yaml'); assert len(discover()) >= 4; "
            "print(sorted({'torch', 'transformers', 'llmcompressor', 'gptqmodel', 'bitsandbytes'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_sharpness_can_be_limited_to_named_trajectories(default_config):
    from qtraj.config import measures_sharpness

    default_config["sharpness"]["runs"] = ["wsd", "wsd-lawa"]
    config = validate_config(default_config)
    assert [run for run in config["runs"] if measures_sharpness(config, run)] == ["wsd"]
    assert measures_sharpness(config, "wsd-lawa") and not measures_sharpness(config, "wsd-seed1-lawa")
    default_config["sharpness"]["runs"] = ["wsd", "nope"]
    with pytest.raises(ConfigError, match=r"'sharpness.runs': 'nope' is not one of the config's trained runs"):
        validate_config(default_config)


def test_every_summary_figure_the_config_lists_is_drawn_and_no_other(default_config):
    from qtraj.config import SUMMARY_FIGURE_NAMES, summary_figures
    from qtraj.plotting import SUMMARY_FIGURES

    assert tuple(SUMMARY_FIGURES) == SUMMARY_FIGURE_NAMES
    config = validate_config(default_config)
    assert summary_figures(config) == ["loss", "lr", "sharpness", "averaging", "accuracy"]
    plain = yaml.safe_load(DEFAULT.read_text())
    plain["averages"], plain["sharpness"]["runs"] = {}, False
    assert summary_figures(validate_config(plain)) == ["loss", "lr", "accuracy"]
