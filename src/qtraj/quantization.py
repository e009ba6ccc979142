"""Quantize one checkpoint with one config entry, in memory, and record how."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qtraj.methods import QuantSpec, get_method

PACKED_MODEL_CARD = "README.md"


def quantize_model(fp_model, checkpoint_dir: str | Path, spec: QuantSpec, calibration_tokens: str | Path | None,
                   calibration: dict, device, packed_dir: str | Path | None = None) -> tuple:
    """(the quantized model, how it was made): the one place that tells the two kinds of method apart.

    A fake-quant method quantizes a copy of `fp_model` (loaded from `checkpoint_dir`, left untouched); a load-time
    method loads the checkpoint through its engine. Calibration blocks are the first `calibration.num_samples`
    blocks of `calibration.seq_len` tokens of the calibration split, in order, so every checkpoint and method
    sees exactly the same text. With `packed_dir`, the engine's packed model is saved there with a model card.
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
    packed = None if packed_dir is None else Path(packed_dir)
    if packed is not None:
        packed.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if method.quantizes_at_load:
        try:
            model = method.load(Path(checkpoint_dir), spec, device)
        except Exception as error:
            raise RuntimeError(f"{spec.method} could not load {checkpoint_dir} as {spec.name!r}: "
                               f"{type(error).__name__}: {error}") from error
        if packed is not None:  # before any forward pass: bitsandbytes repacks 4-bit CPU weights at the first
            model.save_pretrained(str(packed))
    else:
        model = method.quantize(fp_model, Path(checkpoint_dir), spec, blocks, packed)
    info = quantization_info(spec, blocks, time.perf_counter() - started)
    info["expert_calibration"] = expert_calibration(method, fp_model, blocks)
    if packed is not None:
        (packed / PACKED_MODEL_CARD).write_text(packed_model_card(checkpoint_dir, info))
    return model, info


# Only llm-compressor quantizes fused experts here (the other engines are refused for them), with
# moe_calibrate_all_experts: every expert runs on every calibration token, while the model's output keeps its routing.
ALL_EXPERTS = "every expert on every calibration token (llm-compressor moe_calibrate_all_experts)"


def expert_calibration(method, fp_model, calibration_blocks) -> str | None:
    """What the row says about how an MoE model's experts were calibrated (None: no fused experts)."""
    if not any(matrix.layout == "expert" for matrix in method.quantized_matrices(fp_model).values()):
        return None
    return ALL_EXPERTS if calibration_blocks is not None else "no calibration (round to nearest)"


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


def packed_model_card(checkpoint_dir: str | Path, info: dict) -> str:
    """A short model card for a saved packed model: what it is, how it was made, and how to load it."""
    import json

    from qtraj.checkpoints import read_checkpoint_info

    source = read_checkpoint_info(checkpoint_dir)
    settings = {key: info[key] for key in ("method", "bits", "group_size", "symmetric", "options", "engine",
                                           "engine_version", "calibration_samples", "calibration_seq_len")}
    return (f"# {source.run}/{source.checkpoint} quantized with {info['name']}\n\n"
            f"Written by qtraj: checkpoint `{source.run}/{source.checkpoint}` (step {source.step}, tokens "
            f"{source.tokens}, phase {source.phase}) quantized with `{info['name']}` in the engine's own packed "
            f"format ({info['engine']} {info['engine_version']}).\n\n"
            f"```json\n{json.dumps(settings, indent=2, sort_keys=True)}\n```\n\n"
            "The numbers qtraj reports for this model (ΔQ L, accuracy, layer errors) are in its results dataset; "
            "load this folder with the engine's loader (compressed-tensors models with `transformers` or vLLM, "
            "GPTQModel's with `GPTQModel.load`, bitsandbytes' with `transformers`).\n")
