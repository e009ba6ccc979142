"""`qtraj families --verify`: family files against the hub's branches, on recorded hub answers (no network).

The hub is stood in for by `RecordedHub`, which answers `model_info` and `list_repo_refs` the way `HfApi` does:
with huggingface_hub's own `ModelInfo` / `GitRefs` / `GitRefInfo` built from payloads shaped like the hub API's
JSON, and with the errors huggingface_hub's own `hf_raise_for_status` raises for recorded HTTP responses. Branch
names are those of allenai/OLMoE-1B-7B-0924's model card; commit hashes are made up. The offline and
no-connection cases run the real `HfApi`.
"""

import hashlib
import json
import socket

import httpx
import huggingface_hub
import pytest
import yaml
from huggingface_hub import constants
from huggingface_hub.hf_api import GitRefInfo, GitRefs, ModelInfo
from huggingface_hub.utils import hf_raise_for_status

from qtraj.catalog import (
    LISTED_NAMES,
    HubUnreachable,
    compare_revisions,
    render_verification,
    verify_catalog,
)
from qtraj.cli import main

REPO = "allenai/OLMoE-1B-7B-0924"
FAMILY = {
    "name": "OLMoE (test)", "repo": REPO, "parameters": 6.9e9,
    "stages": {"pretraining": "pretraining", "anneal": "anneal"},
    "revisions": [{"revision": "step10000-tokens41B", "step": 10000},
                  {"revision": "step1200000-tokens5033B", "step": 1200000},
                  {"revision": "main", "stage": "anneal"}],
}
LISTED = ["step10000-tokens41B", "step1200000-tokens5033B", "main"]


def refs_payload(branches: list[str], tags: list[str] = ()) -> dict:
    """What GET /api/models/<repo>/refs answers (the JSON list_repo_refs parses)."""
    def ref(name: str, kind: str) -> dict:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": hashlib.sha1(name.encode()).hexdigest()}
    return {"branches": [ref(name, "heads") for name in branches], "converts": [],
            "tags": [ref(name, "tags") for name in tags]}


def git_refs(payload: dict) -> GitRefs:
    """The payload as list_repo_refs returns it."""
    def info(item: dict) -> GitRefInfo:
        return GitRefInfo(name=item["name"], ref=item["ref"], target_commit=item["targetCommit"])
    return GitRefs(branches=[info(item) for item in payload["branches"]], converts=[],
                   tags=[info(item) for item in payload["tags"]])


def hub_error(status: int, error_code: str | None, repo: str = REPO) -> Exception:
    """The exception huggingface_hub raises for a recorded HTTP answer of the hub."""
    headers = {"X-Error-Code": error_code, "X-Error-Message": "recorded"} if error_code else {}
    response = httpx.Response(status, headers=headers,
                              request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo}/refs"))
    try:
        hf_raise_for_status(response)
    except Exception as error:  # noqa: BLE001 - whatever the library raises is the recording
        return error
    raise AssertionError(f"HTTP {status} raised nothing")


class RecordedHub:
    """Answers like HfApi for one repo: its model info (id, gated) and its refs, or a recorded error."""

    def __init__(self, payload: dict | None = None, *, hub_id: str = REPO, gated: bool | str = False,
                 error: Exception | None = None):
        self.payload, self.hub_id, self.gated, self.error = payload, hub_id, gated, error
        self.asked: list[str] = []

    def model_info(self, repo_id: str, *, timeout: float | None = None) -> ModelInfo:
        self.asked.append(repo_id)
        if self.error is not None:
            raise self.error
        return ModelInfo(id=self.hub_id, gated=self.gated)

    def list_repo_refs(self, repo_id: str) -> GitRefs:
        if self.error is not None:
            raise self.error
        return git_refs(self.payload)


@pytest.fixture
def families_dir(tmp_path):
    (tmp_path / "olmoe.yaml").write_text(yaml.safe_dump(FAMILY, sort_keys=False))
    return tmp_path


def verify_one(folder, hub: RecordedHub, family: dict | None = None):
    if family is not None:  # a folder of its own: family files are cached by path and modification time
        folder = folder / f"variant{len(list(folder.glob('variant*')))}"
        folder.mkdir()
        (folder / "olmoe.yaml").write_text(yaml.safe_dump(family, sort_keys=False))
    [result] = verify_catalog(folder, "olmoe", api=hub)
    assert hub.asked == [family["repo"] if family else REPO]
    return result


def test_all_revisions_present(families_dir):
    result = verify_one(families_dir, RecordedHub(refs_payload(LISTED)))
    assert (result.missing, result.extra, result.problems, result.hub_repo) == ([], [], [], REPO)
    assert render_verification([result]) == f"olmoe ({REPO}): 3 of 3 revisions on the hub"


def test_a_revision_missing_on_the_hub_is_a_problem_that_names_it(families_dir):
    result = verify_one(families_dir, RecordedHub(refs_payload(["step1200000-tokens5033B", "main"])))
    assert result.missing == ["step10000-tokens41B"]
    [problem] = result.problems
    assert "step10000-tokens41B" in problem and "family file" in problem
    assert "2 of 3 revisions on the hub" in render_verification([result])


def test_a_revision_that_is_a_tag_is_on_the_hub():
    assert compare_revisions(["v1.0", "main"], ["main"], ["v1.0"]) == ([], [])


def test_extra_hub_branches_are_listed_in_natural_order_and_are_no_problem(families_dir):
    extra = [f"step{step}-tokens{step * 4194304 // 10**9}B" for step in (5000, 20000, 15000)] + ["fp32"]
    result = verify_one(families_dir, RecordedHub(refs_payload(LISTED + extra)))
    assert result.problems == [] and result.missing == []
    assert result.extra == ["fp32", "step5000-tokens20B", "step15000-tokens62B", "step20000-tokens83B"]
    assert "4 hub branch(es) not in the file: fp32, step5000-tokens20B, step15000" in render_verification([result])


def test_a_long_list_of_extra_branches_is_cut_in_text_but_whole_in_json(families_dir, monkeypatch, capsys):
    extra = [f"step{step}-tokens0B" for step in range(1, LISTED_NAMES + 6)]
    hub = RecordedHub(refs_payload(LISTED + extra))
    text = render_verification([verify_one(families_dir, hub)])
    assert text.endswith(", …") and f"{len(extra)} hub branch(es)" in text
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)  # the CLI makes its own HfApi
    assert main(["families", "--families-dir", str(families_dir), "--verify", "olmoe", "--format", "json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["extra"] == extra and entry["revisions"] == 3


def test_a_gated_repo_says_how_to_get_access_and_that_the_file_should_say_gated(families_dir):
    result = verify_one(families_dir, RecordedHub(error=hub_error(401, "GatedRepo")))
    [problem] = result.problems
    assert "gated" in problem and "HF_TOKEN" in problem and "`gated: true`" in problem
    assert result.hub_repo is None and "not checked" in render_verification([result])
    # a file that already says gated is not told to say it again
    result = verify_one(families_dir, RecordedHub(error=hub_error(401, "GatedRepo")), {**FAMILY, "gated": True})
    assert "`gated: true`" not in result.problems[0]


def test_gating_that_the_file_gets_wrong_is_a_problem(families_dir):
    result = verify_one(families_dir, RecordedHub(refs_payload(LISTED), gated="manual"))
    assert result.problems == [f"the hub says {REPO} is gated: set `gated: true` in the family file"]
    result = verify_one(families_dir, RecordedHub(refs_payload(LISTED)), {**FAMILY, "gated": True})
    assert result.problems == [f"the hub says {REPO} is not gated: set `gated: false` in the family file"]


def test_a_renamed_repo_is_reported_with_its_new_id(families_dir):
    # the hub client follows the rename's redirect, so the answer carries the new id
    result = verify_one(families_dir, RecordedHub(refs_payload(LISTED), hub_id="ai2/OLMoE-1B-7B-0924"))
    [problem] = result.problems
    assert "renamed" in problem and "`repo: ai2/OLMoE-1B-7B-0924`" in problem
    assert result.missing == []  # the branches were still compared


def test_a_missing_repo_says_to_fix_the_repo_key(families_dir):
    result = verify_one(families_dir, RecordedHub(error=hub_error(404, "RepoNotFound")))
    [problem] = result.problems
    assert f"the hub has no repo {REPO!r}" in problem and "`repo:`" in problem


def test_a_hub_error_is_reported_for_that_family_only(families_dir):
    result = verify_one(families_dir, RecordedHub(error=hub_error(503, None)))
    assert result.problems == [f"the hub answered {REPO} with HTTP 503 (branches not checked): rerun later"]


def test_the_exit_status_is_1_when_a_file_disagrees_with_the_hub(families_dir, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: RecordedHub(refs_payload(LISTED)))
    assert main(["families", "--families-dir", str(families_dir), "--verify"]) == 0
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: RecordedHub(refs_payload(["main"])))
    assert main(["families", "--families-dir", str(families_dir), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "1 of 3 revisions on the hub" in out and "  ! 2 revision(s)" in out


def test_an_unknown_family_name_lists_the_known_ones(families_dir, capsys):
    assert main(["families", "--families-dir", str(families_dir), "--verify", "olmo"]) == 2
    err = capsys.readouterr().err
    assert "--verify olmo: there is no family file" in err and "families: olmoe" in err


def one_line_without_traceback(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert "Traceback" not in captured.err
    return line


def test_offline_says_so_in_one_line_and_asks_nothing(families_dir, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 in the environment sets it
    hub = RecordedHub(refs_payload(LISTED))
    with pytest.raises(HubUnreachable):
        verify_catalog(families_dir, api=hub)
    assert hub.asked == []
    assert main(["families", "--families-dir", str(families_dir), "--verify"]) == 2
    line = one_line_without_traceback(capsys)
    assert line.startswith("qtraj: cannot verify family files") and "HF_HUB_OFFLINE is set" in line


def test_no_connection_says_so_in_one_line(families_dir, monkeypatch, capsys):
    with socket.socket() as probe:  # a local port nobody listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # the real HfApi, asking nobody
    assert main(["families", "--families-dir", str(families_dir), "--verify", "olmoe"]) == 2
    line = one_line_without_traceback(capsys)
    assert line.startswith("qtraj: cannot verify family files") and "ConnectError" in line


def test_a_file_that_does_not_validate_is_its_own_problem_and_the_others_are_still_checked(families_dir):
    (families_dir / "broken.yaml").write_text("name: Broken\nrepo: someone/broken\nrevisions: []\n")  # no parameters
    hub = RecordedHub(refs_payload(LISTED))
    broken, olmoe = verify_catalog(families_dir, api=hub)
    assert broken.slug == "broken" and "parameters" in broken.problems[0] and broken.hub_repo is None
    assert olmoe.slug == "olmoe" and olmoe.problems == [] and hub.asked == [REPO]
