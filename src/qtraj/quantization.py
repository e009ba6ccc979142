"""Quantize one checkpoint with one config entry, and record how."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from qtraj.methods import QuantSpec, get_method
from qtraj.methods.base import QUANTIZATION_FILE


def quantize_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, spec: QuantSpec,
                        calibration_tokens: str | Path | None, calibration: dict) -> dict:
    """Quantize `checkpoint_dir` into `out_dir` (a model folder) and write `qtraj_quantization.json` there.

    Calibration blocks are the first `calibration.num_samples` blocks of `calibration.seq_len` tokens of
    the calibration split, in order, so every checkpoint and method sees exactly the same text.
    """
    method = get_method(spec.method)
    if not method.stores_model:
        raise ValueError(f"quantization {spec.name!r}: method {spec.method!r} quantizes at load time; "
                         "evaluate it with load_quantized_model instead of storing it")
    try:
        method.check(spec)
    except ValueError as error:
        raise ValueError(f"quantization {spec.name!r}: {error}") from error
    blocks = None
    if method.needs_calibration:
        from qtraj.tokenization import token_blocks

        blocks = token_blocks(np.load(calibration_tokens), calibration["seq_len"], calibration["num_samples"])
    out_dir = Path(out_dir)
    started = time.perf_counter()
    method.quantize(Path(checkpoint_dir), out_dir, spec, blocks)
    info = quantization_info(spec, blocks, time.perf_counter() - started)
    (out_dir / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def quantization_info(spec: QuantSpec, calibration_blocks: np.ndarray | None, seconds: float) -> dict:
    """How a model was quantized: the config entry, the engine and its version, the calibration, the time."""
    method = get_method(spec.method)
    engine = method.engine_of(spec)
    return {
        **spec.as_dict(),
        "engine": engine,
        "engine_version": method.engine_version(engine),
        "calibration_samples": 0 if calibration_blocks is None else int(calibration_blocks.shape[0]),
        "calibration_seq_len": 0 if calibration_blocks is None else int(calibration_blocks.shape[1]),
        "quantize_seconds": seconds,
    }


def load_quantized_model(model_dir: str | Path, checkpoint_dir: str | Path, spec: QuantSpec, device):
    """The quantized model for evaluation and how it was made: a stored folder is loaded as is, a load-time
    method quantizes the full-precision checkpoint now (its load time is its quantization time)."""
    from qtraj.evaluation import load_causal_lm

    method = get_method(spec.method)
    if method.stores_model:
        return load_causal_lm(model_dir, device), read_quantization_info(model_dir)
    started = time.perf_counter()
    try:
        model = method.load(Path(checkpoint_dir), spec, device)
    except Exception as error:
        raise RuntimeError(f"{spec.method} could not load {checkpoint_dir} as {spec.name!r}: "
                           f"{type(error).__name__}: {error}") from error
    return model, quantization_info(spec, None, time.perf_counter() - started)


def read_quantization_info(model_dir: str | Path) -> dict:
    path = Path(model_dir, QUANTIZATION_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no {QUANTIZATION_FILE}: it was not written by qtraj's "
                                "quantize step; delete it and rerun")
    return json.loads(path.read_text())
