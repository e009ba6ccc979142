import json

import numpy as np
import pytest
import torch

from qtraj.checkpoints import METADATA_FILE, evenly_spaced_steps, read_checkpoint_info
from qtraj.evaluation import NonFiniteLossError, cross_entropy, load_causal_lm
from qtraj.schedules import Schedule
from qtraj.steps import evaluate_fp
from qtraj.training import TrainingDivergedError, TrainingSpec, train
from tests.conftest import TINY_MODEL


def test_checkpoint_is_a_complete_hugging_face_folder_with_metadata(trained_checkpoint):
    names = {path.name for path in trained_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA_FILE} <= names
    info = read_checkpoint_info(trained_checkpoint)
    assert (info.step, info.tokens, info.phase, info.source) == (60, 60 * 8 * 64, "decay", "trained")
    assert info.lr == pytest.approx(0.0)


def test_training_lowers_the_loss(trained_checkpoint, token_stream):
    from qtraj.tokenization import token_blocks

    blocks = token_blocks(token_stream, 65, 16)
    loss = cross_entropy(load_causal_lm(trained_checkpoint), blocks, 8).loss
    assert loss < np.log(512) - 0.5  # clearly better than uniform over the vocabulary


def test_loss_does_not_depend_on_batch_size(trained_checkpoint, token_stream):
    from qtraj.tokenization import token_blocks

    model, blocks = load_causal_lm(trained_checkpoint), token_blocks(token_stream, 65, 10)
    one, many = cross_entropy(model, blocks, 1), cross_entropy(model, blocks, 4)
    assert one.tokens == many.tokens == 640
    assert one.loss == pytest.approx(many.loss, rel=1e-5)
    manual = torch.nn.functional.cross_entropy(
        model(input_ids=torch.from_numpy(blocks[:, :-1].astype(np.int64))).logits.reshape(-1, 512),
        torch.from_numpy(blocks[:, 1:].astype(np.int64)).reshape(-1))
    assert one.loss == pytest.approx(manual.item(), rel=1e-5)


def test_diverging_training_stops_with_a_clear_error(tmp_path, tokenizer_dir, token_stream, monkeypatch):
    import qtraj.training

    real_build = qtraj.training.build_model

    def poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        with torch.no_grad():
            model.model.embed_tokens.weight[:] = float("nan")
        return model

    monkeypatch.setattr(qtraj.training, "build_model", poisoned)
    spec = TrainingSpec("boom", TINY_MODEL, Schedule("wsd", 1e-3, 5, 1), 32, 2, 0.1, 1.0, 0)
    with pytest.raises(TrainingDivergedError, match=r"run 'boom'.*step 1.*Lower training.peak_lr"):
        train(spec, token_stream, tokenizer_dir, {5: tmp_path / "ckpt"})


def test_nan_model_loss_is_refused(trained_checkpoint, token_stream):
    model = load_causal_lm(trained_checkpoint)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        cross_entropy(model, token_stream[: 65 * 2].reshape(2, 65), 2)


def test_corrupt_checkpoint_names_the_folder_and_the_fix(tmp_path, trained_checkpoint, token_stream):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    np.save(tmp_path / "validation.npy", token_stream)
    with pytest.raises(RuntimeError, match=r"broken.*corrupt, delete it and rerun"):
        evaluate_fp(str(broken), str(tmp_path / "validation.npy"),
                    {"seq_len": 64, "max_blocks": 2, "batch_size": 2}, str(tmp_path / "fp.parquet"))
    assert not (tmp_path / "fp.parquet").exists()


def test_checkpoint_metadata_is_required(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a qtraj checkpoint"):
        read_checkpoint_info(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"run": "r", "checkpoint": "c", "step": 1, "tokens": 2,
                                                      "lr": 0.1, "phase": "stable", "source": "local"}))
    assert read_checkpoint_info(tmp_path).source == "local"


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert evenly_spaced_steps(1200, 10) == list(range(120, 1201, 120))
    with pytest.raises(ValueError):
        evenly_spaced_steps(5, 10)
