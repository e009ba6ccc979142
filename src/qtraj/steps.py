"""One function per workflow step: what each `scripts/*.py` adapter calls.

Each takes file paths and plain settings, so every step runs (and is tested) without Snakemake.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq

from qtraj import results
from qtraj.checkpoints import read_checkpoint_info
from qtraj.evaluation import NonFiniteLossError, cross_entropy, load_causal_lm, pick_device
from qtraj.provenance import config_hash, provenance

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def split_corpus(corpus: str, outputs: dict[str, str], validation_fraction: float,
                 calibration_fraction: float) -> None:
    from qtraj.corpus import write_splits

    counts = write_splits(corpus, outputs, validation_fraction, calibration_fraction)
    log.info("documents per split: %s", counts)


def train_tokenizer(train_split: str, out_dir: str, vocab_size: int) -> None:
    from qtraj.corpus import iter_texts
    from qtraj.tokenization import train_bpe_tokenizer

    train_bpe_tokenizer(iter_texts(train_split), vocab_size, out_dir)


def tokenize_split(split_file: str, tokenizer_dir: str, out_file: str) -> None:
    from transformers import AutoTokenizer

    from qtraj.corpus import iter_texts
    from qtraj.tokenization import encode_documents

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = encode_documents(tokenizer, iter_texts(split_file))
    np.save(out_file, tokens)
    log.info("%s: %d tokens", split_file, len(tokens))


def train_run(run: str, settings: dict, train_tokens: str, tokenizer_dir: str,
              checkpoint_dirs: dict[int, str], training_log: str) -> None:
    from qtraj.config import training_spec
    from qtraj.training import train

    spec = training_spec(run, settings)
    rows = train(spec, np.load(train_tokens), tokenizer_dir, checkpoint_dirs)
    results.write_rows(rows, results.TRAINING_LOG_SCHEMA, training_log)


def quantize(checkpoint_dir: str, out_dir: str, spec: dict, calibration_tokens: str, calibration: dict) -> None:
    from qtraj.methods import QuantSpec
    from qtraj.quantization import quantize_checkpoint

    info = quantize_checkpoint(checkpoint_dir, out_dir, QuantSpec(**spec), calibration_tokens, calibration)
    log.info("quantized %s with %s in %.1f s", checkpoint_dir, spec["name"], info["quantize_seconds"])


def _validation_loss(model_dir: str, validation_tokens: str, evaluation: dict, what: str):
    from qtraj.tokenization import token_blocks

    blocks = token_blocks(np.load(validation_tokens), evaluation["seq_len"] + 1, evaluation["max_blocks"])
    device = pick_device()
    started = time.perf_counter()
    model = load_causal_lm(model_dir, device)
    try:
        loss = cross_entropy(model, blocks, evaluation["batch_size"])
    except NonFiniteLossError as error:
        raise NonFiniteLossError(f"{what}: {error}. {model_dir} is broken: delete it and rerun "
                                 "(for a quantized model, also check the method's settings)") from error
    return loss, time.perf_counter() - started, device.type


def evaluate_fp(checkpoint_dir: str, validation_tokens: str, evaluation: dict, out_file: str) -> None:
    info = read_checkpoint_info(checkpoint_dir)
    loss, seconds, device = _validation_loss(checkpoint_dir, validation_tokens, evaluation,
                                             f"checkpoint {info.run}/{info.checkpoint}")
    row = {**asdict(info), "loss_fp": loss.loss, "ppl_fp": loss.perplexity, "eval_tokens": loss.tokens,
           "eval_seconds": seconds, **provenance({"evaluation": evaluation}, device)}
    results.write_rows([row], results.FP_EVAL_SCHEMA, out_file)
    log.info("%s/%s: loss_fp %.5f over %d tokens", info.run, info.checkpoint, loss.loss, loss.tokens)


def evaluate_quantized(model_dir: str, fp_eval: str, validation_tokens: str, evaluation: dict,
                       out_file: str) -> None:
    from qtraj.quantization import read_quantization_info

    info = read_checkpoint_info(model_dir)
    quant = read_quantization_info(model_dir)
    fp_row = pq.read_table(fp_eval).to_pylist()[0]
    if fp_row["config_hash"] != config_hash({"evaluation": evaluation}):
        raise ValueError(f"{fp_eval} was evaluated with other settings than {out_file}; delete it and rerun")
    loss, seconds, device = _validation_loss(model_dir, validation_tokens, evaluation,
                                             f"{info.run}/{info.checkpoint} quantized with {quant['name']}")
    settings = {"evaluation": evaluation, "quantization": {k: quant[k] for k in
                                                           ("name", "method", "bits", "group_size",
                                                            "symmetric", "options")}}
    row = {
        **asdict(info),
        "quantization": quant["name"], "method": quant["method"], "bits": quant["bits"],
        "group_size": quant["group_size"], "symmetric": quant["symmetric"],
        "options": json.dumps(quant["options"], sort_keys=True),
        "engine": quant["engine"], "engine_version": quant["engine_version"],
        "loss_fp": fp_row["loss_fp"], "loss_q": loss.loss,
        "delta_q_loss": results.delta_q_loss(loss.loss, fp_row["loss_fp"]),
        "loss_diff": loss.loss - fp_row["loss_fp"], "ppl_fp": fp_row["ppl_fp"], "ppl_q": loss.perplexity,
        "eval_tokens": loss.tokens, "calibration_samples": quant["calibration_samples"],
        "calibration_seq_len": quant["calibration_seq_len"], "quantize_seconds": quant["quantize_seconds"],
        "eval_seconds": seconds, **provenance(settings, device),
    }
    results.write_rows([row], results.QUANTIZED_EVAL_SCHEMA, out_file)
    log.info("%s/%s %s: loss_q %.5f, delta_q_loss %.4f%%", info.run, info.checkpoint, quant["name"],
             loss.loss, 100 * row["delta_q_loss"])


def aggregate(inputs: dict[str, list[str]], output_dir: str) -> None:
    counts = results.aggregate(inputs, output_dir)
    log.info("results dataset rows: %s", counts)


def plot_run(results_dir: str, run: str, out_file: str) -> None:
    from qtraj.plotting import plot_trajectory

    plot_trajectory(results_dir, run, out_file)
