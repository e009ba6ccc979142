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


BOS_EVALUATION = {"seq_len": 32, "max_blocks": 3, "batch_size": 2, "max_loss_fraction": None}  # random weights


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory, tokenizer_dir):
    """The trained BPE plus a `<s>` (id 512) that its tokenizer.json post-processor puts before every text, as
    Llama-3's and Gemma's do: the same ids for text, so the same validation stream."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    out = tmp_path_factory.mktemp("bos-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory, bos_tokenizer_dir):
    """A tiny random Llama (vocabulary 513, bos_token_id 512) whose folder holds the bos-adding tokenizer."""
    from qtraj.checkpoints import CheckpointInfo, write_checkpoint_info
    from tests.architectures import save_tiny_checkpoint

    folder = save_tiny_checkpoint("LlamaForCausalLM", tmp_path_factory.mktemp("bos") / "step100", bos_tokenizer_dir)
    write_checkpoint_info(folder, CheckpointInfo(run="gemma-like", checkpoint="step100", step=100, tokens=None,
                                                 lr=None, phase=None, source="local"))
    return folder


def fp_row(checkpoint, stream, evaluation, tmp_path):
    import pyarrow.parquet as pq

    np.save(tmp_path / "validation.npy", stream)
    evaluate_fp(str(checkpoint), str(tmp_path / "validation.npy"), evaluation, str(tmp_path / "fp.parquet"))
    return pq.read_table(tmp_path / "fp.parquet").to_pylist()[0]


def test_blocks_start_with_bos_when_the_tokenizer_adds_one(tmp_path, bos_checkpoint, token_stream):
    from qtraj.evaluation import checkpoint_bos_id
    from qtraj.tokenization import validation_blocks

    assert checkpoint_bos_id(bos_checkpoint) == 512
    blocks = validation_blocks(token_stream, 32, 3, bos_id=512)
    assert blocks.shape == (3, 33) and (blocks[:, 0] == 512).all()
    assert blocks[1, 1:].tolist() == token_stream[32:64].tolist()  # seq_len stream tokens per block, no gaps

    row = fp_row(bos_checkpoint, token_stream, BOS_EVALUATION, tmp_path)
    assert row["eval_bos"] is True and row["eval_tokens"] == 32 * 3
    # by hand: inputs <bos> t_0 ... t_30, targets t_0 ... t_31 of each slice of 32; the <bos> is never a target
    model = load_causal_lm(bos_checkpoint)
    targets = torch.from_numpy(token_stream[: 3 * 32].astype(np.int64)).reshape(3, 32)
    inputs = torch.cat([torch.full((3, 1), 512), targets[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert logits.shape[-1] == 513 and targets.numel() == row["eval_tokens"]
    assert row["loss_fp"] == pytest.approx(reference.item(), rel=1e-6)


def test_the_same_model_with_a_tokenizer_that_adds_no_bos_keeps_todays_blocks(tmp_path, bos_checkpoint,
                                                                               tokenizer_dir, token_stream):
    import shutil

    from qtraj.tokenization import token_blocks

    folder = tmp_path / "no-bos"
    shutil.copytree(bos_checkpoint, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, folder / name)
    row = fp_row(folder, token_stream, BOS_EVALUATION, tmp_path)
    assert row["eval_bos"] is False and row["eval_tokens"] == 32 * 3
    today = cross_entropy(load_causal_lm(folder), token_blocks(token_stream, 33, 3), 2)
    assert row["loss_fp"] == today.loss


def test_loss_with_bos_is_the_models_own_loss_of_bos_plus_each_stream_slice(tmp_path, bos_checkpoint, token_stream):
    """Invariance: the blocks' loss is what the model's own `labels` loss gives, slice by slice, for <bos> prepended
    by hand to each unpadded seq_len slice of the stream (equal slices, so the mean of means is the mean)."""
    row = fp_row(bos_checkpoint, token_stream, BOS_EVALUATION, tmp_path)
    model = load_causal_lm(bos_checkpoint)
    losses = []
    for index in range(3):
        sequence = torch.tensor([[512, *token_stream[index * 32 : (index + 1) * 32].tolist()]])
        with torch.no_grad():
            losses.append(model(input_ids=sequence, labels=sequence).loss.item())
    assert row["loss_fp"] == pytest.approx(float(np.mean(losses)), rel=1e-6)


def test_trained_checkpoints_keep_their_blocks_and_numbers(tmp_path, trained_checkpoint, tokenizer_dir, token_stream):
    """The BPE trained here names <|endoftext|> as bos_token but never adds it: no <bos>, and the loss is bit for bit
    the loss of the seq_len + 1 blocks evaluated before <bos> handling existed."""
    from transformers import AutoTokenizer

    from qtraj.evaluation import checkpoint_bos_id
    from qtraj.tokenization import leading_bos_id, token_blocks

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.bos_token_id == 0 and leading_bos_id(tokenizer) is None
    assert checkpoint_bos_id(trained_checkpoint) is None
    evaluation = {"seq_len": 64, "max_blocks": 10, "batch_size": 4}
    row = fp_row(trained_checkpoint, token_stream, evaluation, tmp_path)
    before = cross_entropy(load_causal_lm(trained_checkpoint), token_blocks(token_stream, 65, 10), 4)
    assert row["eval_bos"] is False and row["eval_tokens"] == before.tokens == 640
    assert row["loss_fp"] == before.loss
    assert row["loss_fraction_of_uniform"] == pytest.approx(before.loss / np.log(512))


def test_fp_and_quantized_losses_score_the_same_bos_blocks(tmp_path, bos_checkpoint, token_stream, monkeypatch):
    import pyarrow.parquet as pq

    import qtraj.quantization
    from qtraj import results
    from qtraj.steps import quantize_and_evaluate
    from qtraj.tokenization import validation_blocks

    fp = fp_row(bos_checkpoint, token_stream, BOS_EVALUATION, tmp_path)
    np.save(tmp_path / "calibration.npy", token_stream[-4096:])
    real, kept = qtraj.quantization.quantize_model, {}

    def recording(*args, **kwargs):
        kept["model"], info = real(*args, **kwargs)
        return kept["model"], info

    monkeypatch.setattr(qtraj.quantization, "quantize_model", recording)

    def quantize():
        quantize_and_evaluate(
            checkpoint_dir=str(bos_checkpoint),
            spec={"name": "rtn-w4g32", "method": "rtn", "bits": 4, "group_size": 32},
            fp_eval=str(tmp_path / "fp.parquet"), validation_tokens=str(tmp_path / "validation.npy"),
            calibration_tokens=str(tmp_path / "calibration.npy"), evaluation=BOS_EVALUATION,
            calibration={"num_samples": 4, "seq_len": 32}, out_file=str(tmp_path / "q.parquet"),
            layer_errors_file=str(tmp_path / "layers.parquet"))

    quantize()
    row = pq.read_table(tmp_path / "q.parquet").to_pylist()[0]
    assert row["eval_bos"] is True and row["eval_tokens"] == fp["eval_tokens"] == 96
    assert row["loss_q"] == cross_entropy(kept["model"], validation_blocks(token_stream, 32, 3, 512), 2).loss

    # an fp row of blocks without <bos> (as every row written before eval_bos) is not compared with these
    results.write_rows([{**fp, "eval_bos": None}], results.FP_EVAL_SCHEMA, tmp_path / "fp.parquet")
    with pytest.raises(ValueError, match=r"fp.parquet scored validation blocks without <bos>, but the tokenizer of "
                                         r".*step100 adds <bos>.*delete .*fp.parquet and rerun"):
        quantize()


def test_sharpness_measures_the_loss_of_the_evaluated_blocks(tmp_path, bos_checkpoint, token_stream, monkeypatch):
    import pyarrow.parquet as pq

    import qtraj.sharpness
    from qtraj.steps import sharpness
    from qtraj.tokenization import validation_blocks

    real, seen = qtraj.sharpness.top_hessian_eigenvalue, []

    def recording(model, blocks, *args):
        seen.append(blocks)
        return real(model, blocks, *args)

    monkeypatch.setattr(qtraj.sharpness, "top_hessian_eigenvalue", recording)
    np.save(tmp_path / "validation.npy", token_stream)
    settings = {"seq_len": 16, "blocks": 2, "batch_size": 2, "iterations": 3, "tolerance": 1e-3, "seed": 0}
    sharpness(str(bos_checkpoint), str(tmp_path / "validation.npy"), settings, str(tmp_path / "sharpness.parquet"))
    row = pq.read_table(tmp_path / "sharpness.parquet").to_pylist()[0]
    assert np.array_equal(seen[0], validation_blocks(token_stream, 16, 2, bos_id=512))
    assert row["eval_bos"] is True and row["sharpness_tokens"] == 16 * 2


def test_the_training_log_keeps_about_a_hundred_steps_the_first_and_the_last():
    from qtraj.training import is_logged

    logged = [step for index, step in enumerate(range(1, 202)) if is_logged(step, index, 201)]
    assert logged[:3] == [1, 2, 4] and logged[-2:] == [200, 201] and len(logged) == 102  # 201: no multiple of 2
    resumed = [step for index, step in enumerate(range(601, 801)) if is_logged(step, index, 200)]  # a cooldown
    assert resumed[:2] == [601, 602] and resumed[-1] == 800 and len(resumed) == 101
