"""Time every quantization method on one checkpoint and print its quantize time, eval time and ΔQ L.

    .venv/bin/python bench/quantize_methods.py [checkpoint_dir] [results_dir]

Defaults to the last checkpoint of the default workflow's `wsd` run (run `make run` first). Each method runs
in this one process, as the quantize job does (in memory, from the loaded fp model), so the figures exclude the
per-job start-up that `bench/workflow_jobs.py` shows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from qtraj.evaluation import cross_entropy, load_causal_lm, pick_device
from qtraj.methods import QuantSpec
from qtraj.quantization import quantize_model
from qtraj.tokenization import token_blocks

SPECS = [
    QuantSpec("rtn-w4g32", "rtn", 4, 32), QuantSpec("rtn-w3g32", "rtn", 3, 32),
    QuantSpec("gptq-w4g32", "gptq", 4, 32), QuantSpec("gptq-w3g32", "gptq", 3, 32),
    QuantSpec("gptq-w4g32-gq", "gptq", 4, 32, engine="gptqmodel"),
    QuantSpec("gptq-w3g32-gq", "gptq", 3, 32, engine="gptqmodel"),
    QuantSpec("awq-w4g32", "awq", 4, 32, symmetric=False), QuantSpec("awq-w3g32", "awq", 3, 32, symmetric=False),
    QuantSpec("bnb-int8", "bnb", 8, None), QuantSpec("bnb-nf4", "bnb", 4, 64, options={"quant_type": "nf4"}),
]


def main(checkpoint: str = "results/checkpoints/wsd/step000800", results_dir: str = "results") -> None:
    torch.set_num_threads(1)
    tokens = Path(results_dir) / "data" / "tokens"
    blocks = token_blocks(np.load(tokens / "validation.npy"), 129, 256)
    calibration = {"num_samples": 32, "seq_len": 128}
    device = pick_device()
    fp_model = load_causal_lm(checkpoint, device)
    fp = cross_entropy(fp_model, blocks, 16).loss
    print(f"device {device.type}, 1 thread, checkpoint {checkpoint}, fp loss {fp:.4f}")
    print(f"{'quantization':<14}{'engine':<15}{'quantize s':>11}{'eval s':>8}{'ΔQ L %':>9}")
    for spec in SPECS:
        model, info = quantize_model(fp_model, checkpoint, spec, tokens / "calibration.npy", calibration, device)
        started = time.perf_counter()
        loss = cross_entropy(model, blocks, 16).loss
        seconds = time.perf_counter() - started
        print(f"{spec.name:<14}{info['engine']:<15}{info['quantize_seconds']:>11.2f}{seconds:>8.2f}"
              f"{100 * (loss / fp - 1):>9.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
