"""Quantization methods on a trained tiny model: real llm-compressor runs, checked against the grid."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qtraj.evaluation import cross_entropy, load_causal_lm
from qtraj.methods import QuantSpec, discover, get_method
from qtraj.quantization import quantize_checkpoint, read_quantization_info
from qtraj.tokenization import token_blocks

CALIBRATION = {"num_samples": 16, "seq_len": 64}


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, token_stream):
    path = tmp_path_factory.mktemp("calibration") / "calibration.npy"
    np.save(path, token_stream[-40_000:])
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, trained_checkpoint, calibration_file):
    """method-bits -> quantized model folder, for RTN and GPTQ at 3 and 4 bits, group 16."""
    folders = {}
    for method in ("rtn", "gptq"):
        for bits in (3, 4):
            spec = QuantSpec(name=f"{method}-w{bits}g16", method=method, bits=bits, group_size=16)
            out = tmp_path_factory.mktemp("quantized") / spec.name
            quantize_checkpoint(trained_checkpoint, out, spec, calibration_file, CALIBRATION)
            folders[(method, bits)] = out
    return folders


def linear_weights(folder):
    state = load_file(str(folder / "model.safetensors"))
    return {name: tensor for name, tensor in state.items() if name.endswith("proj.weight")}


def test_registry_discovers_the_method_files():
    assert {"rtn", "gptq"} <= set(discover())
    with pytest.raises(KeyError, match="known methods: gptq, rtn"):
        get_method("nope")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits", [3, 4])
def test_weights_sit_on_a_grid_of_2_to_the_bits_levels_per_group(quantized, trained_checkpoint, method, bits):
    weights = linear_weights(quantized[(method, bits)])
    original = linear_weights(trained_checkpoint)
    assert weights.keys() == original.keys() and len(weights) == 2 * 7
    for name, weight in weights.items():
        groups = weight.reshape(weight.shape[0], -1, 16)
        levels = max(len(torch.unique(groups[row, group])) for row in range(groups.shape[0])
                     for group in range(groups.shape[1]))
        assert levels <= 2**bits, name
        assert not torch.equal(weight, original[name])
    fp_state = load_file(str(trained_checkpoint / "model.safetensors"))
    q_state = load_file(str(quantized[(method, bits)] / "model.safetensors"))
    assert torch.equal(q_state["lm_head.weight"], fp_state["lm_head.weight"])  # lm_head stays full precision


def test_quantization_info_records_engine_and_calibration(quantized):
    info = read_quantization_info(quantized[("gptq", 3)])
    assert info["engine"] == "llmcompressor" and info["engine_version"]
    assert (info["calibration_samples"], info["calibration_seq_len"]) == (16, 64)
    assert read_quantization_info(quantized[("rtn", 3)])["calibration_samples"] == 0


def test_gptq_beats_rtn_at_3_bits_and_fewer_bits_hurt_more(quantized, trained_checkpoint, token_stream):
    blocks = token_blocks(token_stream, 65, 24)
    loss = {key: cross_entropy(load_causal_lm(folder), blocks, 8).loss for key, folder in quantized.items()}
    fp = cross_entropy(load_causal_lm(trained_checkpoint), blocks, 8).loss
    assert all(np.isfinite(value) for value in loss.values())
    assert loss[("gptq", 3)] < loss[("rtn", 3)]
    assert loss[("rtn", 3)] > loss[("rtn", 4)] > fp - 1e-3


def test_group_size_that_does_not_divide_the_layer_is_named(tmp_path, trained_checkpoint):
    spec = QuantSpec(name="rtn-w4g48", method="rtn", bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"group_size 48 does not divide the 64 input features"):
        quantize_checkpoint(trained_checkpoint, tmp_path / "out", spec, None, CALIBRATION)
