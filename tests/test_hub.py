"""The real download code (huggingface_hub) fed from a local hub cache; offline errors that say what to do."""

import json

import pytest
from huggingface_hub import constants

from qtraj.checkpoints import read_checkpoint_info
from qtraj.families import Revision, load_family
from qtraj.hub import HubError, download_checkpoint, download_text, download_tokenizer
from tests.hub_cache import add_model_folder, add_to_hub_cache, fake_commit
from tests.test_families import WSD_FAMILY, write_family


@pytest.fixture
def family(tmp_path):
    return load_family(write_family(tmp_path / "families", "wsd", WSD_FAMILY))


def test_a_cached_revision_becomes_a_checkpoint_folder_linked_to_the_cache(hub_cache, family, trained_checkpoint,
                                                                           tmp_path):
    commit = add_model_folder(hub_cache, "qtraj-test/wsd", "step950-special", trained_checkpoint)
    out = tmp_path / "checkpoints" / "wsd" / "step950-special"
    download_checkpoint("wsd", family, Revision("step950-special", 950, 950_000, "pretrain"), out)
    info = read_checkpoint_info(out)
    assert (info.run, info.checkpoint, info.step, info.phase, info.source) == (
        "wsd", "step950-special", 950, "decay", "hub")
    assert (info.repo, info.revision, info.commit) == ("qtraj-test/wsd", "step950-special", commit)
    weights = out / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent.name == "blobs"

    from qtraj.evaluation import load_causal_lm

    assert load_causal_lm(out) is not None
    weights.unlink()  # what temp() does: the cache keeps its copy
    assert any((hub_cache / "models--qtraj-test--wsd" / "blobs").iterdir())


def test_a_revision_missing_offline_names_the_cache_and_the_fix(hub_cache, family, tmp_path):
    with pytest.raises(HubError, match=r"not in the local hub cache .*HF_HUB_OFFLINE"):
        download_checkpoint("wsd", family, Revision("main", None, None, "sft"), tmp_path / "out")


def test_a_gated_repo_without_a_token_fails_before_any_network_call(hub_cache, family, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    gated = {**family, "gated": True}
    with pytest.raises(HubError, match=r"gated and no Hugging Face token is set.*export HF_TOKEN"):
        download_checkpoint("wsd", gated, Revision("main", None, None, "sft"), tmp_path / "out")


def test_pickle_only_weights_are_refused_unless_the_family_allows_them(hub_cache, family, trained_checkpoint,
                                                                      tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pytorch_model.bin"
    torch.save(load_file(str(trained_checkpoint / "model.safetensors")), pickled)
    files = {item.name: item for item in trained_checkpoint.iterdir()
             if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("qtraj_")}
    add_to_hub_cache(hub_cache, "qtraj-test/wsd", "main", {**files, "pytorch_model.bin": pickled})
    with pytest.raises(HubError, match="only pickle weights.*allow_pickle: true"):
        download_checkpoint("wsd", family, Revision("main", None, None, "sft"), tmp_path / "refused")
    download_checkpoint("wsd", {**family, "allow_pickle": True}, Revision("main", None, None, "sft"),
                        tmp_path / "allowed")
    assert (tmp_path / "allowed" / "pytorch_model.bin").exists()


def test_text_and_tokenizer_come_from_the_cache(hub_cache, tmp_path, trained_checkpoint):
    import gzip

    shard = tmp_path / "shard.json.gz"
    with gzip.open(shard, "wt") as handle:
        for number in range(5):
            handle.write(json.dumps({"text": f"document {number}", "url": "x"}) + "\n")
    add_to_hub_cache(hub_cache, "allenai/c4", "main", {"en/c4-train.00001-of-01024.json.gz": shard}, kind="dataset")
    out = tmp_path / "calibration.jsonl"
    assert download_text("allenai/c4", "en/c4-train.00001-of-01024.json.gz", 3, "text", out) == 3
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [
        "document 0", "document 1", "document 2"]
    with pytest.raises(HubError, match="no field 'content'"):
        download_text("allenai/c4", "en/c4-train.00001-of-01024.json.gz", 3, "content", tmp_path / "x.jsonl")

    add_model_folder(hub_cache, "qtraj-test/wsd", "main", trained_checkpoint)
    download_tokenizer("qtraj-test/wsd", "main", tmp_path / "tokenizer")
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    ref = hub_cache / "models--qtraj-test--wsd" / "refs" / "main"
    assert ref.read_text() == fake_commit("qtraj-test/wsd", "main")


def test_remote_code_runs_only_from_a_pinned_commit(hub_cache, family, tmp_path):
    with pytest.raises(HubError, match="must be pinned: add `commit: <40-hex sha>`"):
        download_checkpoint("wsd", {**family, "trust_remote_code": True}, Revision("main", None, None, "sft"),
                            tmp_path / "out")


def test_remote_code_tokenizers_come_only_from_a_pinned_commit(hub_cache, tmp_path):
    with pytest.raises(HubError, match="tokenizer must come from a pinned commit"):
        download_tokenizer("qtraj-test/wsd", "main", tmp_path / "tokenizer", trust_remote_code=True)


def test_a_linked_tokenizer_file_is_never_written_through(hub_cache, family, trained_checkpoint, tmp_path):
    add_model_folder(hub_cache, "qtraj-test/wsd", "step950-special", trained_checkpoint,
                     skip=("tokenizer.json", "tokenizer_config.json"))
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (trained_checkpoint / name).exists():
            (other / name).write_text((trained_checkpoint / name).read_text())
    blobs_before = {p: p.read_bytes() for p in (hub_cache / "models--qtraj-test--wsd" / "blobs").iterdir()}
    out = tmp_path / "out"
    download_checkpoint("wsd", family, Revision("step950-special", 950, 950_000, "pretrain"), out, other)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    assert {p: p.read_bytes() for p in blobs_before} == blobs_before
