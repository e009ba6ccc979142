"""A quantize job's row, tied to the numbers it compares: its loss_fp is its checkpoint's fp_evals row, its loss_q
the quantized model's loss on the validation blocks (not the calibration text it was quantized with)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from qtraj.evaluation import cross_entropy, load_causal_lm
from qtraj.methods import QuantSpec
from qtraj.quantization import quantize_model
from qtraj.steps import evaluate_fp, quantize_and_evaluate
from qtraj.tokenization import validation_blocks

# random-free settings small enough for seconds: 6 blocks of 64 tokens; the loss check for pretrained models is off
EVALUATION = {"seq_len": 64, "max_blocks": 6, "batch_size": 4, "max_loss_fraction": None}
CALIBRATION = {"num_samples": 4, "seq_len": 64}
SPEC = {"name": "rtn-w3g16", "method": "rtn", "bits": 3, "group_size": 16}


@pytest.fixture(scope="module")
def quantize_job(tmp_path_factory, trained_checkpoint, token_stream):
    """The fp and quantize jobs of one checkpoint, as the workflow runs them, on validation and calibration tokens
    that share no block: (folder, fp row, quantized row, layer-error rows)."""
    folder = tmp_path_factory.mktemp("quantize-job")
    np.save(folder / "validation.npy", token_stream[: 6 * 65])
    np.save(folder / "calibration.npy", token_stream[-4 * 64 :])
    evaluate_fp(str(trained_checkpoint), str(folder / "validation.npy"), EVALUATION, str(folder / "fp.parquet"))
    quantize_and_evaluate(
        checkpoint_dir=str(trained_checkpoint), spec=SPEC, fp_eval=str(folder / "fp.parquet"),
        validation_tokens=str(folder / "validation.npy"), calibration_tokens=str(folder / "calibration.npy"),
        evaluation=EVALUATION, calibration=CALIBRATION, out_file=str(folder / "q.parquet"),
        layer_errors_file=str(folder / "layers.parquet"))
    [fp_row] = pq.read_table(folder / "fp.parquet").to_pylist()
    [row] = pq.read_table(folder / "q.parquet").to_pylist()
    return folder, fp_row, row, pq.read_table(folder / "layers.parquet").to_pylist()


def test_the_quantized_row_carries_its_checkpoints_fp_loss(quantize_job):
    _, fp_row, row, _ = quantize_job
    assert (row["loss_fp"], row["ppl_fp"]) == (fp_row["loss_fp"], fp_row["ppl_fp"])
    assert row["eval_tokens"] == fp_row["eval_tokens"] == 6 * 64
    assert row["delta_q_loss"] == row["loss_q"] / row["loss_fp"] - 1
    assert row["loss_diff"] == row["loss_q"] - row["loss_fp"]
    assert row["loss_q"] > row["loss_fp"]  # 3 bits cost this model loss


def test_loss_q_is_the_quantized_models_loss_on_the_validation_blocks(quantize_job, trained_checkpoint, token_stream):
    """Recomputed here: the same RTN (deterministic) on the same checkpoint, scored on the validation blocks. The
    calibration blocks would give another number: the job must not score the text it quantized with."""
    folder, fp_row, row, _ = quantize_job
    model, _ = quantize_model(load_causal_lm(trained_checkpoint, torch.device("cpu")), trained_checkpoint,
                              QuantSpec(**SPEC), folder / "calibration.npy", CALIBRATION, torch.device("cpu"))
    blocks = validation_blocks(np.load(folder / "validation.npy"), EVALUATION["seq_len"], EVALUATION["max_blocks"])
    quantized, fp = (cross_entropy(model, blocks, EVALUATION["batch_size"]),
                     cross_entropy(load_causal_lm(trained_checkpoint), blocks, EVALUATION["batch_size"]))
    assert (row["loss_q"], fp_row["loss_fp"]) == (quantized.loss, fp.loss)
    # each row's per-block losses are its own model's, in block order: what the paired bootstrap resamples
    assert (row["block_losses"], fp_row["block_losses"]) == (list(quantized.block_losses), list(fp.block_losses))
    assert len(row["block_losses"]) == len(blocks) == 6
    calibration = validation_blocks(np.load(folder / "calibration.npy"), EVALUATION["seq_len"], 3)
    assert row["loss_q"] != cross_entropy(model, calibration, EVALUATION["batch_size"]).loss


def test_layer_errors_cover_every_quantized_matrix_on_calibration_inputs(quantize_job):
    """One row per decoder linear (2 layers x 7), measured on at most the calibration tokens (4 x 64)."""
    _, _, _, layers = quantize_job
    assert len(layers) == 2 * 7 and len({row["layer"] for row in layers}) == 14
    assert {row["input_rows"] for row in layers} == {4 * 64}
    assert all(0 < row["weight_error"] < 1 and row["recon_error"] > 0 for row in layers)
