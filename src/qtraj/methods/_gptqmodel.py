"""Running GPTQ through GPTQModel (ModelCloud's maintained successor of AutoGPTQ; the paper's engine).

GPTQModel packs weights into its own kernels' format; qtraj evaluates what those kernels compute with —
each layer's `dequantize_weight()` (fp16 scales times integer codes, as the torch kernel does) — as
fake-quant weights, so its models are evaluated by the same engine-free code as every other method.

The weights are read back through `GPTQModel.load` of the saved checkpoint, not from the model `quantize()`
leaves in memory: with 7.6 the in-memory layers still hold GPTQ-v1 zero points (offset by one step), which
only the load path converts — dequantizing them directly put every weight one quantization step off.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from qtraj.methods.base import (
    QuantizationMethod,
    QuantSpec,
    WeightMatrix,
    check_same_modules,
    model_with_state,
    owned_state,
)

# GPTQModel sizes a CPU worker pool from the machine and fails on 2-core machines unless told (seen with 7.6).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))

# Importing GPTQModel 7.6 points the Hugging Face caches at a temp folder (its dependency tokenicer sets HF_HOME,
# HF_HUB_CACHE, TRANSFORMERS_CACHE and HF_MODULES_CACHE when HF_HOME is unset), which every later download and
# every child process would then use instead of the user's cache; qtraj puts them back.
CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


def import_gptqmodel():
    """The gptqmodel module, imported without changing the process's Hugging Face cache settings."""
    before = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    try:
        import gptqmodel
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return gptqmodel


# llm-compressor's act-order names -> GPTQModel's switches. GPTQModel's group-aware reordering (its default)
# keeps groups contiguous like llm-compressor's "static" order; "weight"/"group" are classic desc_act.
ACTORDER = {
    "static": {"desc_act": False, "act_group_aware": True},
    "weight": {"desc_act": True, "act_group_aware": False},
    "group": {"desc_act": True, "act_group_aware": False},
    None: {"desc_act": False, "act_group_aware": False},
}


@contextlib.contextmanager
def printed_into_log():
    """GPTQModel prints banners and per-layer tables (~400 lines per job) straight to stdout, i.e. onto
    Snakemake's console: keep them, but in the job's log."""
    import io
    import logging

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        if printed.getvalue().strip():
            logging.getLogger(__name__).info("GPTQModel printed:\n%s", printed.getvalue().rstrip())


def quantize_gptq(method: QuantizationMethod, fp_model: torch.nn.Module, checkpoint_dir: Path, spec: QuantSpec,
                  options: dict, calibration_blocks: np.ndarray, packed_dir: Path | None = None) -> torch.nn.Module:
    """GPTQ through GPTQModel with the method's `options` (defaults filled): a copy of `fp_model` holding the weights
    GPTQModel's kernel computes with. GPTQModel decides from its own model definitions which modules it quantizes,
    so the result is checked against qtraj's `quantized_matrices`. GPTQModel loads the checkpoint its own way and
    its packed model is saved (to `packed_dir`, or a scratch folder) and read back, as the module docstring says."""
    with printed_into_log():
        return _quantize_gptq(method, fp_model, checkpoint_dir, spec, options, calibration_blocks, packed_dir)


def _quantize_gptq(method: QuantizationMethod, fp_model: torch.nn.Module, checkpoint_dir: Path, spec: QuantSpec,
                   options: dict, calibration_blocks: np.ndarray, packed_dir: Path | None) -> torch.nn.Module:
    gptqmodel = import_gptqmodel()
    GPTQModel, QuantizeConfig = gptqmodel.GPTQModel, gptqmodel.QuantizeConfig  # noqa: N806 - the library's names

    from qtraj.checkpoints import trusts_remote_code
    from qtraj.evaluation import check_finite_files, device_map, pick_device

    config = QuantizeConfig(
        bits=spec.bits, group_size=-1 if spec.group_size is None else spec.group_size, sym=spec.symmetric,
        damp_percent=options["dampening"], offload_to_disk=False,
        true_sequential=options["true_sequential"],
        **ACTORDER[options["actorder"]],
    )
    expected = method.quantized_matrices(fp_model)
    if any(matrix.layout == "expert" for matrix in expected.values()):
        # its default routes calibration tokens as the model does and switches an expert that sees few of them to
        # RTN (Fallback, 0.5%) without a word: what such a row measured would not be GPTQ
        raise ValueError(f"quantization {spec.name!r}: GPTQ through GPTQModel on mixture-of-experts models is not "
                         "checked by qtraj (expert routing and its RTN fallback); use engine: llmcompressor")
    # GPTQModel loads the checkpoint its own way: refuse NaN weights before hours of calibration, not after
    check_finite_files(checkpoint_dir)
    device = pick_device()
    placement = device_map(device)
    model = GPTQModel.load(str(checkpoint_dir), config, dtype=torch.float32 if device.type == "cpu" else None,
                           trust_remote_code=trusts_remote_code(checkpoint_dir),
                           **({"device_map": "auto"} if placement == "auto" else {"device": device.type}))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration_blocks]
    model.quantize(calibration, batch_size=8, calibration_sort=None)
    # the packed model goes to node-local scratch (TMPDIR) unless the config asked to keep it
    scratch = (contextlib.nullcontext(str(packed_dir)) if packed_dir is not None
               else tempfile.TemporaryDirectory(prefix="qtraj-gptqmodel-"))
    with scratch as folder:
        model.save(folder)
        del model
        packed = GPTQModel.load(folder, backend="torch", device=device.type,
                                trust_remote_code=trusts_remote_code(checkpoint_dir))
        return dequantized_model(packed.model, expected, fp_model, stored_dtype(checkpoint_dir, fp_model))


def stored_dtype(checkpoint_dir: Path, fp_model: torch.nn.Module) -> torch.dtype:
    """The dtype the checkpoint's weights are saved in (its config's `dtype`), else the model's."""
    from transformers import AutoConfig

    from qtraj.checkpoints import trusts_remote_code

    config = AutoConfig.from_pretrained(str(checkpoint_dir), trust_remote_code=trusts_remote_code(checkpoint_dir))
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else next(fp_model.parameters()).dtype


@torch.no_grad()
def dequantized_model(packed_model: torch.nn.Module, expected: dict[str, WeightMatrix], fp_model: torch.nn.Module,
                      weight_dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `fp_model` with each quantized matrix replaced by what GPTQModel's kernel computes with
    (rounded to the checkpoint's `weight_dtype`, as a saved quantized checkpoint would hold it). Everything else
    comes from `fp_model`, not from GPTQModel's model: its saved checkpoint holds the unquantized tensors
    (embeddings, norms, head, biases) rounded to fp16, which would add a non-quantization error to every number
    measured (seen with 7.6: all of them differed)."""
    packed = {name: module for name, module in packed_model.named_modules()
              if hasattr(module, "dequantize_weight") and hasattr(module, "qweight")}
    if not packed:
        raise RuntimeError("GPTQModel quantized no layer")
    check_same_modules(set(expected), set(packed), "GPTQModel")
    state = owned_state(fp_model.state_dict(), expected)
    for name, matrix in expected.items():
        # dequantize_weight() is [in_features, out_features] for every layer it packs, nn.Linear and Conv1D alike
        # (measured: a square GPT-2 c_proj matches its Conv1D weight as is, a Llama q_proj only transposed)
        matrix.write(state, packed[name].dequantize_weight().T.to(weight_dtype).cpu())
    return model_with_state(fp_model, state)
