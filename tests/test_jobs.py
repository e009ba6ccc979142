"""The jobs that make checkpoints: what a cooldown job reads is what its parent's training job saves."""

import yaml

from qtraj.checkpoints import checkpoint_name
from qtraj.config import validate_config
from qtraj.jobs import Job
from qtraj.sources import source_of
from tests.conftest import REPO_ROOT


def test_a_cooldown_resumes_the_checkpoint_its_parent_saves_at_the_branch_step():
    """rules/cooldown.smk's input (rules/common.smk: cooldown_parent) comes from the cooldown source: for each branch
    end, the parent run's checkpoint at the branch step, which the parent's training job saves."""
    config = yaml.safe_load((REPO_ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config["cooldowns"] = {"wsd-cd": {"from": "wsd", "at": [20, 10], "length": 8}}
    config = validate_config(config)
    cooldown, parent = source_of(config, "wsd-cd"), source_of(config, "wsd")
    assert cooldown.parent("wsd-cd") == "wsd"
    branch_ends = {checkpoint: cooldown.parent_checkpoint("wsd-cd", checkpoint)
                   for checkpoint in cooldown.checkpoints("wsd-cd")}
    assert branch_ends == {"step000018": ("wsd", checkpoint_name(10)), "step000028": ("wsd", checkpoint_name(20))}
    assert {checkpoint for _, checkpoint in branch_ends.values()} <= set(parent.checkpoints("wsd"))
    assert cooldown.making_jobs("wsd-cd") == [Job("cooldown", "wsd-cd", "step000018"),
                                              Job("cooldown", "wsd-cd", "step000028")]
