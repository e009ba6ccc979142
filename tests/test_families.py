"""Family files: validation, revision expansion, LR / phase, selectors, and every shipped family."""

import json
import re
from pathlib import Path

import pytest
import yaml

from qtraj.catalog import describe_schedule
from qtraj.cli import main
from qtraj.config import ConfigError
from qtraj.families import (
    checkpoint_source,
    expand_revisions,
    load_family,
    revision_lr_and_phase,
    select_revisions,
)
from qtraj.schedules import WSD_DECAY_SHAPES
from qtraj.schema import FAMILY_SCHEMA_PATH, load_schema
from tests.conftest import REPO_ROOT

FAMILIES_DIR = REPO_ROOT / "config" / "families"

WSD_FAMILY = {
    "name": "Test WSD family",
    "repo": "qtraj-test/wsd",
    "parameters": 1e6,
    "tokens_per_step": 1000,
    "schedule": {"type": "wsd", "peak_lr": 1e-3, "warmup_steps": 100, "total_steps": 1000, "decay_start_step": 900},
    "stages": {"pretrain": "pretraining", "sft": "post-training"},
    "revisions": [{"revision": "main", "stage": "sft"},
                  {"revision": "step950-special", "step": 950, "tokens": 950_000, "stage": "pretrain"}],
    "revision_ranges": [{"template": "step{step}-tokens{tokens_b}B", "start": 100, "stop": 900, "every": 200,
                         "stage": "pretrain", "tokens_per_step": 4_000_000}],
}


def write_family(folder: Path, slug: str, family: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(family, sort_keys=False))
    return path


def test_revisions_expand_in_training_order_with_tokens(tmp_path):
    family = load_family(write_family(tmp_path, "wsd", WSD_FAMILY))
    revisions = expand_revisions(family)
    assert [r.revision for r in revisions] == [
        "step100-tokens0B", "step300-tokens1B", "step500-tokens2B", "step700-tokens3B", "step900-tokens4B",
        "step950-special", "main"]
    assert revisions[1].tokens == 1_200_000_000 and revisions[-1].step is None
    assert [r.index for r in revisions] == list(range(7))


def test_lr_and_phase_follow_the_family_schedule(tmp_path):
    family = load_family(write_family(tmp_path, "wsd", WSD_FAMILY))
    by_name = {r.revision: r for r in expand_revisions(family)}
    assert revision_lr_and_phase(family, by_name["step100-tokens0B"]) == (pytest.approx(1e-3), "warmup")
    assert revision_lr_and_phase(family, by_name["step500-tokens2B"]) == (pytest.approx(1e-3), "stable")
    lr, phase = revision_lr_and_phase(family, by_name["step950-special"])
    assert phase == "decay" and lr == pytest.approx(0.5e-3)
    assert revision_lr_and_phase(family, by_name["main"]) == (None, "post-training")


def test_selectors_pick_stages_tokens_every_nth_and_last(tmp_path):
    revisions = expand_revisions(load_family(write_family(tmp_path, "wsd", WSD_FAMILY)))
    names = lambda selector: [r.revision for r in select_revisions(revisions, selector)]  # noqa: E731
    assert len(names({})) == 7
    assert names({"stages": ["sft"]}) == ["main"]
    assert names({"tokens": [1e9, 3e9]}) == ["step300-tokens1B", "step500-tokens2B", "step700-tokens3B"]
    # every N-th counts back from the last, so the final revision is always kept
    assert names({"stages": ["pretrain"], "every": 2}) == ["step300-tokens1B", "step700-tokens3B", "step950-special"]
    assert names({"last": 2}) == ["step950-special", "main"]
    assert names({"revisions": ["main", "step300-tokens1B"]}) == ["step300-tokens1B", "main"]
    assert names({"stages": ["pretrain"], "last": 1, "revisions": ["main"]}) == ["step950-special", "main"]
    with pytest.raises(ConfigError, match="stages \\['rl'\\] do not exist"):
        select_revisions(revisions, {"stages": ["rl"]})
    with pytest.raises(ConfigError, match="does not list: nope"):
        select_revisions(revisions, {"revisions": ["nope"]})


@pytest.mark.parametrize(("change", "message"), [
    ({"schedule": {"type": "wsdd", "peak_lr": 1e-3, "total_steps": 10}}, "schedule.type.*'wsdd' is not allowed"),
    ({"repo": "no-slash"}, "config key 'repo'"),
    ({"revisions": [{"revision": "main", "stage": "rl"}]}, "stage 'rl', which `stages` does not declare"),
    ({"revisions": [{"revision": "has/slash", "stage": "sft"}]}, "revisions.0.revision"),
    ({"parameters": "big"}, "config key 'parameters'"),
    ({"schedule": {**WSD_FAMILY["schedule"], "decay_shape": "sqrt"}}, "schedule.decay_shape"),
    ({"schedule": {"type": "cosine", "peak_lr": 1e-3, "total_steps": 1000, "decay_shape": "1-sqrt"}},
     "applies to a wsd schedule only"),
])
def test_malformed_family_files_name_the_field(tmp_path, change, message):
    path = write_family(tmp_path, "bad", {**WSD_FAMILY, **change})
    with pytest.raises(ConfigError, match=message) as error:
        load_family(path)
    assert str(path.resolve()) in str(error.value)


SHIPPED = sorted(FAMILIES_DIR.glob("*.yaml"))


def test_the_catalog_covers_the_papers_families():
    repos = {load_family(path)["repo"] for path in SHIPPED}
    for repo in ["HuggingFaceTB/SmolLM3-3B-checkpoints", "allenai/OLMo-2-0425-1B", "allenai/OLMo-2-1124-7B",
                 "allenai/OLMo-2-1124-13B", "allenai/OLMo-2-0325-32B", "swiss-ai/Apertus-8B-2509", "LLM360/Amber",
                 "open-sci/open-sci-ref-v0.01-1.7b-nemotron-hq-1T-4096", "allenai/OLMo-1B-hf",
                 "EleutherAI/pythia-160m"]:
        assert repo in repos


@pytest.mark.parametrize("path", SHIPPED, ids=[path.stem for path in SHIPPED])
def test_every_shipped_family_validates_and_its_selectors_resolve(path):
    family = load_family(path)
    revisions = expand_revisions(family)
    assert revisions, path
    for revision in revisions:
        lr, phase = revision_lr_and_phase(family, revision)
        # a family whose schedule is not known (null) leaves its pretraining checkpoints' phase null too
        unknown = family["schedule"] is None and family["stages"][revision.stage] == "pretraining"
        assert phase in {"warmup", "stable", "decay", "anneal", "post-training"} or (unknown and phase is None)
        assert lr is None or 0 <= lr <= family["schedule"]["peak_lr"] * (1 + 1e-9)
    assert select_revisions(revisions, {"last": 3})[-1] == revisions[-1]
    assert len(select_revisions(revisions, {"every": 10})) == -(-len(revisions) // 10)


# The smallest family file (README: adding a family): no schedule, no stages; every revision is pretraining.
MINIMAL_FAMILY = """\
name: Pythia 70M
repo: EleutherAI/pythia-70m
parameters: 70426624
revisions:
  - {revision: step143000, step: 143000}
"""


def test_a_five_line_family_file_loads_and_its_checkpoints_get_null_lr_and_phase(tmp_path):
    path = tmp_path / "pythia-70m.yaml"
    path.write_text(MINIMAL_FAMILY)
    assert len(MINIMAL_FAMILY.splitlines()) == 5
    assert MINIMAL_FAMILY in (Path(__file__).parents[1] / "README.md").read_text()  # the README's example, verbatim
    family = load_family(path)
    assert family["schedule"] is None and family["stages"] == {"pretraining": "pretraining"}
    [revision] = expand_revisions(family)
    assert (revision.revision, revision.step, revision.stage) == ("step143000", 143000, "pretraining")
    assert revision_lr_and_phase(family, revision) == (None, None)
    # what the download job records for it
    config = {"families_dir": str(tmp_path), "families": {"pythia-70m": {"select": {}}}}
    source = checkpoint_source(config, "pythia-70m", "step143000")
    assert (source["lr"], source["phase"]) == (None, None)


def test_without_a_schedule_anneal_and_post_training_stages_keep_their_phase(tmp_path):
    family = {key: value for key, value in WSD_FAMILY.items() if key != "schedule"}
    by_name = {r.revision: r for r in expand_revisions(load_family(write_family(tmp_path, "noschedule", family)))}
    loaded = load_family(tmp_path / "noschedule.yaml")
    assert revision_lr_and_phase(loaded, by_name["main"]) == (None, "post-training")
    assert revision_lr_and_phase(loaded, by_name["step950-special"]) == (None, None)


def test_a_revision_without_a_stage_needs_the_stage_pretraining_declared(tmp_path):
    family = {**WSD_FAMILY, "revisions": [{"revision": "main"}], "revision_ranges": []}
    with pytest.raises(ConfigError, match="revision 'main' has stage 'pretraining', which `stages` does not declare"):
        load_family(write_family(tmp_path, "nostage", family))


# --- decay shapes, corrected facts, new families, caveats ----------------------------------------------------------

def test_the_family_schema_allows_the_decay_shapes_schedules_know():
    schedule = load_schema(FAMILY_SCHEMA_PATH)["properties"]["schedule"]["properties"]
    assert tuple(schedule["decay_shape"]["enum"]) == WSD_DECAY_SHAPES
    assert "default" not in schedule["decay_shape"]  # Schedule's default is the one default


def test_a_family_with_a_1_sqrt_cooldown_gets_its_lr_from_that_shape(tmp_path):
    family = load_family(write_family(tmp_path, "sqrt", {**WSD_FAMILY, "schedule": {
        **WSD_FAMILY["schedule"], "decay_shape": "1-sqrt"}}))
    by_name = {r.revision: r for r in expand_revisions(family)}
    lr, phase = revision_lr_and_phase(family, by_name["step950-special"])  # half-way through the decay
    assert phase == "decay" and lr == pytest.approx(1e-3 * (1 - 0.5 ** 0.5))  # linear would give 0.5e-3
    assert describe_schedule(family["schedule"]).endswith("1-sqrt decay from 900")


def test_apertus_cools_down_as_1_sqrt_to_a_tenth_of_the_peak():
    for slug in ("apertus-8b", "apertus-70b"):
        assert load_family(FAMILIES_DIR / f"{slug}.yaml")["schedule"]["decay_shape"] == "1-sqrt"
    family = load_family(FAMILIES_DIR / "apertus-8b.yaml")
    schedule = family["schedule"]
    revision = next(r for r in expand_revisions(family) if r.revision == "step2550000-tokens14372B")
    progress = (revision.step - schedule["decay_start_step"]) / (schedule["total_steps"] - schedule["decay_start_step"])
    peak, final = schedule["peak_lr"], schedule["final_lr"]
    lr, phase = revision_lr_and_phase(family, revision)
    assert phase == "decay" and lr == pytest.approx(final + (peak - final) * (1 - progress ** 0.5))


def test_pythia_1b_uses_the_peak_lr_of_the_config_that_ran():
    # models/1B/pythia-1b.yml says lr 0.00025 / min_lr 0.000025; the README table's 3e-4 is not what ran
    schedule = load_family(FAMILIES_DIR / "pythia-1b.yaml")["schedule"]
    assert (schedule["peak_lr"], schedule["final_lr"]) == (2.5e-4, 2.5e-5)


def test_olmoe_lists_the_pre_annealing_branch_and_main_annealed_from_it():
    family = load_family(FAMILIES_DIR / "olmoe-1b-7b.yaml")
    assert (family["repo"], family["architecture"]) == ("allenai/OLMoE-1B-7B-0924", "OlmoeForCausalLM")
    revisions = expand_revisions(family)
    by_name = {r.revision: r for r in revisions}
    assert revisions[-1].revision == "main" and family["stages"][by_name["main"].stage] == "anneal"
    pre_anneal = by_name["step1200000-tokens5033B"]
    assert family["stages"][pre_anneal.stage] == "pretraining" and revisions[-2] == pre_anneal
    # main: the pre-annealing tokens plus ~100B of annealing (model card)
    assert by_name["main"].tokens - pre_anneal.tokens == pytest.approx(100e9, rel=1e-3)


@pytest.mark.parametrize("slug", ["olmoe-1b-7b"])
def test_step_token_branch_names_agree_with_steps_and_tokens(slug):
    """stepN-tokensMB: N is the step, M the tokens in billions, truncated (OLMoE's step10000-tokens41B = 41.94B)."""
    family = load_family(FAMILIES_DIR / f"{slug}.yaml")
    for revision in expand_revisions(family):
        match = re.fullmatch(r"step(\d+)-tokens(\d+)B", revision.revision)
        if match:
            assert revision.step == int(match[1]), revision
            assert revision.tokens == revision.step * family["tokens_per_step"], revision
            assert revision.tokens // 10**9 == int(match[2]), revision


def test_the_crfm_gpt2_family_has_the_checkpoints_its_training_config_saved():
    family = load_family(FAMILIES_DIR / "crfm-gpt2-small-x21.yaml")
    steps = [r.step for r in expand_revisions(family)]
    # conf/gpt2-mistral-small-config.yaml checkpoint_frequency: every 10 to 100, 50 to 2000, 100 to 20000,
    # 1000 to 400000 (as TransformerLens lists them)
    expected = [*range(0, 100, 10), *range(100, 2000, 50), *range(2000, 20000, 100), *range(20000, 400001, 1000)]
    assert steps == expected and len(steps) == 609
    assert all(r.revision == f"checkpoint-{r.step}" and r.tokens == r.step * 512 * 1024
               for r in expand_revisions(family))


def test_the_catalog_warns_about_a_family_with_a_caveat(tmp_path, capsys):
    assert main(["families", "--families-dir", str(FAMILIES_DIR)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    caveats = {path.stem for path in SHIPPED if load_family(path)["caveat"]}
    assert caveats >= {"opensci-1.7b"}
    assert sorted(line.split("'")[1] for line in warnings) == sorted(caveats)
    assert any("rotary" in line for line in warnings if "'opensci-1.7b'" in line)
    # a family without a caveat: no warning; the JSON carries the field either way
    write_family(tmp_path, "wsd", WSD_FAMILY)
    assert main(["families", "--families-dir", str(tmp_path), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)[0]["caveat"] == ""
