"""Running GPTQ through GPTQModel (ModelCloud's maintained successor of AutoGPTQ; the paper's engine).

GPTQModel packs weights into its own kernels' format; qtraj stores what those kernels compute with —
each layer's `dequantize_weight()` (fp16 scales times integer codes, as the torch kernel does) — as
fake-quant weights, so its models are evaluated by the same engine-free code as every other method.

The weights are read back through `GPTQModel.load` of the saved checkpoint, not from the model `quantize()`
leaves in memory: with 7.6 the in-memory layers still hold GPTQ-v1 zero points (offset by one step), which
only the load path converts — dequantizing them directly put every weight one quantization step off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from qtraj.checkpoints import copy_non_weight_files
from qtraj.methods.base import QuantizationMethod, QuantSpec, check_same_modules

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


def quantize_gptq(method: QuantizationMethod, checkpoint_dir: Path, out_dir: Path, spec: QuantSpec, options: dict,
                  calibration_blocks: np.ndarray) -> None:
    """GPTQ through GPTQModel with the method's `options` (defaults filled); GPTQModel decides from its own model
    definitions which modules it quantizes, so the result is checked against qtraj's `quantized_modules`."""
    gptqmodel = import_gptqmodel()
    GPTQModel, QuantizeConfig = gptqmodel.GPTQModel, gptqmodel.QuantizeConfig  # noqa: N806 - the library's names

    from qtraj.checkpoints import trusts_remote_code
    from qtraj.evaluation import check_finite_files, device_map, model_skeleton, pick_device

    config = QuantizeConfig(
        bits=spec.bits, group_size=-1 if spec.group_size is None else spec.group_size, sym=spec.symmetric,
        damp_percent=options["dampening"], offload_to_disk=False,
        true_sequential=options.get("true_sequential", True),
        **ACTORDER[options["actorder"]],
    )
    expected = set(method.quantized_modules(model_skeleton(checkpoint_dir)))
    # GPTQModel loads the checkpoint its own way: refuse NaN weights before hours of calibration, not after
    check_finite_files(checkpoint_dir)
    device = pick_device()
    placement = device_map(device)
    model = GPTQModel.load(str(checkpoint_dir), config, dtype=torch.float32 if device.type == "cpu" else None,
                           trust_remote_code=trusts_remote_code(checkpoint_dir),
                           **({"device_map": "auto"} if placement == "auto" else {"device": device.type}))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration_blocks]
    model.quantize(calibration, batch_size=8, calibration_sort=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.gptq-") as packed_dir:
        model.save(packed_dir)
        del model
        packed = GPTQModel.load(packed_dir, backend="torch", device=device.type,
                                trust_remote_code=trusts_remote_code(checkpoint_dir))
        save_dequantized(packed.model, expected, checkpoint_dir, out_dir)


@torch.no_grad()
def save_dequantized(model: torch.nn.Module, expected: set[str], checkpoint_dir: Path, out_dir: Path) -> None:
    """The checkpoint's own state with each quantized layer's weight replaced by what GPTQModel's kernel computes
    with. Everything else comes from the checkpoint, not from GPTQModel's model: its saved checkpoint holds the
    unquantized tensors (embeddings, norms, head, biases) rounded to fp16, which would add a non-quantization
    error to every number measured (seen with 7.6: all of them differed).

    The checkpoint is read in its stored dtype and each weight replaced in place, so host memory stays near one
    copy of the model (bf16 for the paper's checkpoints) plus one layer."""
    from huggingface_hub import save_torch_state_dict

    from qtraj.evaluation import load_causal_lm

    packed = {name: module for name, module in model.named_modules()
              if hasattr(module, "dequantize_weight") and hasattr(module, "qweight")}
    if not packed:
        raise RuntimeError("GPTQModel quantized no layer")
    check_same_modules(expected, set(packed), "GPTQModel")
    reference = load_causal_lm(checkpoint_dir, torch.device("cpu"), dtype="auto")
    state = reference.state_dict()
    for name, module in packed.items():
        key = f"{name}.weight"
        # GPTQModel returns [in_features, out_features]; nn.Linear stores [out, in]
        state[key] = module.dequantize_weight().T.to(device="cpu", dtype=state[key].dtype).contiguous()
    copy_non_weight_files(checkpoint_dir, out_dir)
    save_torch_state_dict(state, str(out_dir))
