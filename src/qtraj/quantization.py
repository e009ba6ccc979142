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
    try:
        method.check(spec)
    except ValueError as error:
        raise ValueError(f"quantization {spec.name!r}: {error}") from error
    blocks = None
    if method.needs_calibration:
        from qtraj.tokenization import token_blocks

        blocks = token_blocks(np.load(calibration_tokens), calibration["seq_len"], calibration["num_samples"])
    out_dir = Path(out_dir)
    engine = method.engine_of(spec)
    started = time.perf_counter()
    method.quantize(Path(checkpoint_dir), out_dir, spec, blocks)
    info = {
        **spec.as_dict(),
        "engine": engine,
        "engine_version": method.engine_version(engine),
        "calibration_samples": 0 if blocks is None else int(blocks.shape[0]),
        "calibration_seq_len": 0 if blocks is None else int(blocks.shape[1]),
        "quantize_seconds": time.perf_counter() - started,
    }
    (out_dir / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_quantization_info(model_dir: str | Path) -> dict:
    path = Path(model_dir, QUANTIZATION_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no {QUANTIZATION_FILE}: it was not written by qtraj's "
                                "quantize step; delete it and rerun")
    return json.loads(path.read_text())
