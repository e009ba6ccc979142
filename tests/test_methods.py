"""Quantization methods on a trained tiny model: real llm-compressor runs, checked against the grid."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qtraj.evaluation import cross_entropy, load_causal_lm
from qtraj.methods import QuantSpec, discover, get_method
from qtraj.quantization import quantize_model
from qtraj.tokenization import token_blocks

CALIBRATION = {"num_samples": 16, "seq_len": 64}
CPU = torch.device("cpu")


def quantize(checkpoint, spec, calibration_file=None, packed_dir=None):
    """(quantized model, info) the way the quantize job makes them: from the checkpoint's fp model, in memory."""
    return quantize_model(load_causal_lm(checkpoint, CPU), checkpoint, spec, calibration_file, CALIBRATION, CPU,
                          packed_dir)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, token_stream):
    path = tmp_path_factory.mktemp("calibration") / "calibration.npy"
    np.save(path, token_stream[-40_000:])
    return path


@pytest.fixture(scope="module")
def quantized_with_info(trained_checkpoint, calibration_file):
    """(method, bits) -> (quantized model, info), for RTN and GPTQ at 3 and 4 bits, group 16."""
    return {(method, bits): quantize(trained_checkpoint, QuantSpec(name=f"{method}-w{bits}g16", method=method,
                                                                   bits=bits, group_size=16), calibration_file)
            for method in ("rtn", "gptq") for bits in (3, 4)}


@pytest.fixture(scope="module")
def quantized(quantized_with_info):
    return {key: model for key, (model, _) in quantized_with_info.items()}


AWQ_SPEC = QuantSpec(name="awq-w4g16", method="awq", bits=4, group_size=16, symmetric=False, options={"n_grid": 10})


@pytest.fixture(scope="module")
def awq_quantized(tmp_path_factory, trained_checkpoint, calibration_file):
    """(AWQ-quantized model, its packed folder): quantized once for the tests that need AWQ (its grid search is the
    slowest quantization here)."""
    packed = tmp_path_factory.mktemp("awq") / "packed"
    model, _ = quantize(trained_checkpoint, AWQ_SPEC, calibration_file, packed_dir=packed)
    return model, packed


def linear_weights(model_or_folder):
    if isinstance(model_or_folder, torch.nn.Module):
        state = {name: tensor.detach() for name, tensor in model_or_folder.state_dict().items()}
    else:
        state = load_file(str(model_or_folder / "model.safetensors"))
    return {name: tensor for name, tensor in state.items() if name.endswith("proj.weight")}


def test_registry_discovers_the_method_files():
    assert {"rtn", "gptq"} <= set(discover())
    with pytest.raises(KeyError, match="known methods: awq, bnb, gptq, rtn"):
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
    q_state = quantized[(method, bits)].state_dict()
    assert torch.equal(q_state["lm_head.weight"], fp_state["lm_head.weight"])  # lm_head stays full precision


def test_quantizing_leaves_the_fp_model_it_was_given_untouched(trained_checkpoint, calibration_file):
    fp = load_causal_lm(trained_checkpoint, CPU)
    before = {key: value.clone() for key, value in fp.state_dict().items()}
    spec = QuantSpec(name="gptq-w3g16", method="gptq", bits=3, group_size=16)
    model, _ = quantize_model(fp, trained_checkpoint, spec, calibration_file, CALIBRATION, CPU)
    assert all(torch.equal(before[key], value) for key, value in fp.state_dict().items())
    assert type(model) is type(fp) and model is not fp
    assert not any(hasattr(module, "quantization_scheme") for module in model.modules())  # a plain model


def test_quantization_info_records_engine_and_calibration(quantized_with_info):
    info = quantized_with_info[("gptq", 3)][1]
    assert info["engine"] == "llmcompressor" and info["engine_version"]
    assert (info["calibration_samples"], info["calibration_seq_len"]) == (16, 64)
    assert quantized_with_info[("rtn", 3)][1]["calibration_samples"] == 0


def test_gptq_beats_rtn_at_3_bits_and_fewer_bits_hurt_more(quantized, trained_checkpoint, token_stream):
    blocks = token_blocks(token_stream, 65, 24)
    loss = {key: cross_entropy(model, blocks, 8).loss for key, model in quantized.items()}
    fp = cross_entropy(load_causal_lm(trained_checkpoint), blocks, 8).loss
    assert all(np.isfinite(value) for value in loss.values())
    assert loss[("gptq", 3)] < loss[("rtn", 3)]
    assert loss[("rtn", 3)] > loss[("rtn", 4)] > fp - 1e-3


def test_group_size_that_does_not_divide_the_layer_is_named(tmp_path, trained_checkpoint):
    spec = QuantSpec(name="rtn-w4g48", method="rtn", bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"group_size 48 does not divide the 64 input features"):
        quantize(trained_checkpoint, spec)


def test_layer_errors_match_a_hand_computed_layer():
    from qtraj.layer_errors import layer_errors
    from qtraj.methods.base import WeightMatrix

    torch.manual_seed(0)
    fp = torch.nn.Sequential()
    fp.add_module("proj", torch.nn.Linear(4, 2, bias=False))
    quantized = torch.nn.Sequential()
    quantized.add_module("proj", torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        fp.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))
        quantized.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]]))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    [error] = layer_errors(fp, quantized, {"proj": WeightMatrix("proj", "proj.weight", "linear")}, {"proj": x})
    assert error.weight_error_abs == pytest.approx(1.0)  # one entry differs by 1
    assert error.weight_error == pytest.approx(1.0 / np.sqrt(5.0))
    # X Wᵀ = [[1, 2], [0, 0]];  X Ŵᵀ = [[1, 3], [0, 2]]  -> difference [[0, 1], [0, 2]]
    assert error.recon_error == pytest.approx(np.sqrt(5.0))
    assert error.recon_error_rel == pytest.approx(np.sqrt(5.0) / np.sqrt(5.0))
    assert (error.module_type, error.layer_index, error.input_rows) == ("proj", None, 2)


def test_layer_errors_of_a_biased_layer_compare_its_weights_only():
    """The same layer with a bias (kept in full precision, so the same in both): the errors are those of its weights,
    computed by hand. The bias is small (3% of the output), so a bias left in the quantized output passes the 10%
    kernel check and only these numbers can show it."""
    from qtraj.layer_errors import layer_errors
    from qtraj.methods.base import WeightMatrix

    fp, quantized = torch.nn.Sequential(), torch.nn.Sequential()
    fp.add_module("proj", torch.nn.Linear(4, 2))
    quantized.add_module("proj", torch.nn.Linear(4, 2))
    with torch.no_grad():
        fp.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))
        quantized.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]]))
        for layer in (fp.proj, quantized.proj):
            layer.bias.copy_(torch.tensor([0.05, -0.05]))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0], [2.0, 0.0, 0.0, 0.0]])
    [error] = layer_errors(fp, quantized, {"proj": WeightMatrix("proj", "proj.weight", "linear")}, {"proj": x})
    # X Wᵀ = [[1, 2], [0, 0], [2, 0]];  X Ŵᵀ = [[1, 3], [0, 2], [2, 0]]: the bias belongs to neither side. A third
    # row makes ‖X Wᵀ‖ = 3, not ‖W‖ = √5 as in the test above, so the relative error also shows what it divides by
    assert error.weight_error_abs == pytest.approx(1.0)
    assert error.recon_error == pytest.approx(np.sqrt(5.0))
    assert error.recon_error_rel == pytest.approx(np.sqrt(5.0) / 3.0)
    assert error.input_rows == 3


def test_layer_errors_refuse_a_dequantized_weight_the_layer_does_not_compute_with():
    from qtraj.layer_errors import layer_errors
    from qtraj.methods.base import WeightMatrix

    class RepackedLinear(torch.nn.Linear):
        """Computes with other weights than its `weight` says, like a kernel whose format was misread."""

        def forward(self, x):
            return x @ (-self.weight).T

    fp, quantized = torch.nn.Sequential(), torch.nn.Sequential()
    fp.add_module("proj", torch.nn.Linear(4, 2, bias=False))
    quantized.add_module("proj", RepackedLinear(4, 2, bias=False))
    with pytest.raises(RuntimeError, match="layer proj: its output differs by 200.0%"):
        layer_errors(fp, quantized, {"proj": WeightMatrix("proj", "proj.weight", "linear")}, {"proj": torch.ones(3, 4)})


def test_method_files_must_implement_the_step_their_storage_needs():
    from qtraj.methods.base import QuantizationMethod, register

    class NoLoader(QuantizationMethod):
        name, engines, needs_calibration, supported_bits, storage = "noloader", ("x",), False, (4,), "load-time"

    with pytest.raises(TypeError, match="load-time storage, so it must implement `load`"):
        register(NoLoader)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_reconstruction_error_is_at_most_rtn_on_every_layer(quantized, trained_checkpoint, calibration_file,
                                                                 bits):
    from qtraj.layer_errors import capture_inputs, layer_errors
    from qtraj.methods.base import quantized_matrices

    fp = load_causal_lm(trained_checkpoint)
    matrices = quantized_matrices(fp)
    blocks = token_blocks(np.load(calibration_file), CALIBRATION["seq_len"], CALIBRATION["num_samples"])
    inputs = capture_inputs(fp, matrices, blocks, 8, max_rows=blocks.size)
    assert all(x.shape == (blocks.size, x.shape[1]) for x in inputs.values())
    gptq = {e.layer: e for e in layer_errors(fp, quantized[("gptq", bits)], matrices, inputs)}
    rtn = {e.layer: e for e in layer_errors(fp, quantized[("rtn", bits)], matrices, inputs)}
    assert gptq.keys() == rtn.keys() and len(gptq) == 14
    for layer in gptq:
        assert gptq[layer].recon_error <= rtn[layer].recon_error * (1 + 1e-6), layer
        assert 0 < rtn[layer].weight_error < 0.5


@pytest.mark.parametrize(("bits", "options", "layer_class"), [
    (4, {"quant_type": "nf4"}, "Linear4bit"),
    (4, {"quant_type": "fp4", "double_quant": True}, "Linear4bit"),
    (8, {}, "Linear8bitLt"),
])
def test_bitsandbytes_models_are_evaluated_through_bitsandbytes(tmp_path, trained_checkpoint, token_stream, bits,
                                                                options, layer_class):
    spec = QuantSpec(name="bnb", method="bnb", bits=bits, group_size=64 if bits == 4 else None, options=options)
    model, info = quantize(trained_checkpoint, spec)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == layer_class
    from qtraj.methods.bnb import dequantized_bnb_weight as dequantized_weight

    if bits == 4:  # NF4 / FP4: at most 16 code values, scaled per block of 64 weights
        before_forward = dequantized_weight(layer)
        blocks_of_64 = before_forward.reshape(-1, 64)
        assert max(len(torch.unique(block)) for block in blocks_of_64) <= 16
    blocks = token_blocks(token_stream, 65, 16)
    fp = cross_entropy(load_causal_lm(trained_checkpoint), blocks, 8).loss
    loss = cross_entropy(model, blocks, 8).loss
    if bits == 4:  # the CPU kernel may repack the weights at the first forward; they must still read the same
        assert torch.allclose(dequantized_weight(layer), before_forward, rtol=0, atol=1e-2 * before_forward.abs().max())
    assert loss != fp and abs(loss / fp - 1) < 0.05  # changed, but not broken (it may even be lower)
    assert info["engine"] == "bitsandbytes" and info["engine_version"] and info["quantize_seconds"] > 0


def test_awq_is_stored_in_the_checkpoints_basis_on_its_grid_and_beats_rtn(tmp_path, trained_checkpoint,
                                                                          calibration_file, token_stream,
                                                                          awq_quantized):
    """AWQ's quantized weights, with its smoothing scales taken back out, give the same function as
    llm-compressor's folded model (to float rounding), sit on the grid once the scales are put back in, and
    beat RTN on the same asymmetric grid."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from qtraj.methods import _llmcompressor as engine
    from qtraj.methods.awq import _no_pinned_memory_without_cuda, smoothing_scales

    blocks = token_blocks(token_stream, 65, 24)
    rtn_spec = QuantSpec(name="rtn-w4g16", method="rtn", bits=4, group_size=16, symmetric=False)
    models = {"awq": awq_quantized[0], "rtn": quantize(trained_checkpoint, rtn_spec)[0]}
    losses = {method: cross_entropy(model, blocks, 8).loss for method, model in models.items()}
    assert np.isfinite(losses["awq"]) and losses["awq"] < losses["rtn"] * 1.01

    # llm-compressor's own (folded) model, quantized the same way in this process
    folded = load_causal_lm(trained_checkpoint)
    calibration = token_blocks(np.load(calibration_file), CALIBRATION["seq_len"], CALIBRATION["num_samples"])
    keys = list(folded.state_dict())
    with _no_pinned_memory_without_cuda():
        oneshot(model=folded, recipe=[AWQModifier(n_grid=10), QuantizationModifier(
            config_groups=engine.weight_scheme(AWQ_SPEC), ignore=["lm_head"])],
            **engine.calibration_kwargs(trained_checkpoint, calibration))
    # the folded model's own tensors (smoothed norms included), its quantized weights fake-quantized
    from qtraj.methods.base import quantized_matrices

    folded_basis = load_causal_lm(trained_checkpoint)
    folded_basis.load_state_dict({key: folded.state_dict()[key] for key in keys})
    reference = load_causal_lm(trained_checkpoint)
    reference.load_state_dict(engine.fake_quant_state_dict(folded, folded_basis, quantized_matrices(reference)))
    assert cross_entropy(reference, blocks, 8).loss == pytest.approx(losses["awq"], rel=1e-5)

    original, folded_weights = linear_weights(trained_checkpoint), linear_weights(folded)
    scales = {name: smoothing_scales(folded_weights[name].cpu(), original[name]) for name in original}
    assert any(not torch.allclose(column, torch.ones_like(column)) for _, column in scales.values())
    for name, weight in linear_weights(models["awq"]).items():
        row, column = scales[name]
        smoothed = weight.double() / row[:, None] * column[None, :]
        groups = smoothed.reshape(weight.shape[0], -1, 16)
        levels = max(len(torch.unique(torch.round(groups[r, g] / groups[r, g].abs().max() * 1e4)))
                     for r in range(groups.shape[0]) for g in range(groups.shape[1]))
        assert levels <= 16, name


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_fake_quant_model_scores_like_the_engines_own_packed_model(request, tmp_path, trained_checkpoint,
                                                                   calibration_file, token_stream, method):
    """The in-memory dequantized model gives the loss of llm-compressor's own packed model, saved on request
    (`packed_models`) with a model card and loaded back by transformers through compressed-tensors. AWQ's packed
    model keeps llm-compressor's smoothed basis; qtraj's is in the checkpoint's basis: the same function.

    Tolerance 1e-5 relative: both hold the same grid values, so only float summation order may differ.
    """
    from transformers import AutoModelForCausalLM

    if method == "awq":
        model, packed = request.getfixturevalue("awq_quantized")
    else:
        spec = QuantSpec(name=f"{method}-w4g16", method=method, bits=4, group_size=16)
        packed = tmp_path / "packed"
        model, _ = quantize(trained_checkpoint, spec, calibration_file, packed_dir=packed)
    native = AutoModelForCausalLM.from_pretrained(str(packed), dtype=torch.float32).eval()
    assert "quantization_config" in native.config.to_dict()
    assert f"quantized with `{method}-w4g16`" in (packed / "README.md").read_text()
    assert (packed / "tokenizer.json").is_file()
    blocks = token_blocks(token_stream, 65, 16)
    assert cross_entropy(model, blocks, 8).loss == pytest.approx(cross_entropy(native, blocks, 8).loss, rel=1e-5)



def test_gptq_through_gptqmodel_is_a_separate_engine_on_the_same_grid(tmp_path, quantized, trained_checkpoint,
                                                                      calibration_file, token_stream):
    spec = QuantSpec(name="gptq-w3g16-gptqmodel", method="gptq", bits=3, group_size=16, engine="gptqmodel")
    model, info = quantize(trained_checkpoint, spec, calibration_file)
    assert info["engine"] == "gptqmodel" and info["engine_version"].startswith("7.")
    weights, original = linear_weights(model), linear_weights(trained_checkpoint)
    assert weights.keys() == original.keys()
    for name, weight in weights.items():
        groups = weight.reshape(weight.shape[0], -1, 16)
        assert max(len(torch.unique(groups[r, g])) for r in range(groups.shape[0])
                   for g in range(groups.shape[1])) <= 8, name
        # correct export: 21-29% here; reading GPTQModel's in-memory v1 zero points (one step off): 62-66%
        assert torch.linalg.norm(weight - original[name]) / torch.linalg.norm(original[name]) < 0.35, name
    blocks = token_blocks(token_stream, 65, 24)
    loss = {engine: cross_entropy(quantized_model, blocks, 8).loss
            for engine, quantized_model in (("gptqmodel", model), ("llmcompressor", quantized[("gptq", 3)]),
                                            ("rtn", quantized[("rtn", 3)]))}
    assert loss["gptqmodel"] < loss["rtn"]
    assert abs(loss["gptqmodel"] / loss["llmcompressor"] - 1) < 0.02  # same algorithm, different libraries


def test_a_folder_missing_weights_or_holding_extra_ones_is_refused_naming_them(tmp_path, trained_checkpoint):
    """transformers would fill a missing tensor with random values and only print a report."""
    import shutil

    from safetensors.torch import save_file

    from qtraj.evaluation import LoadError

    state = load_file(str(trained_checkpoint / "model.safetensors"))
    for name, change in (("missing", lambda s: s.pop("model.norm.weight")),
                         ("unexpected", lambda s: s.update({"model.extra.weight": torch.ones(2)}))):
        folder = tmp_path / name
        shutil.copytree(trained_checkpoint, folder)
        edited = dict(state)
        change(edited)
        save_file(edited, str(folder / "model.safetensors"), metadata={"format": "pt"})
        key = "model.norm.weight" if name == "missing" else "model.extra.weight"
        with pytest.raises(LoadError, match=rf"1 {name} keys \({key}\)"):
            load_causal_lm(folder)


def test_a_quantized_model_whose_unquantized_tensors_changed_is_refused(quantized, trained_checkpoint):
    import copy

    from qtraj.layer_errors import check_unquantized_unchanged
    from qtraj.methods.base import quantized_matrices

    fp, model = load_causal_lm(trained_checkpoint), copy.deepcopy(quantized[("rtn", 4)])
    names = {matrix.key for matrix in quantized_matrices(fp).values()}
    check_unquantized_unchanged(fp, model, names, "fine")  # only the quantized linears' weights differ
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(1 + 2**-10)
    with pytest.raises(RuntimeError, match=r"broken: 1 tensors .* differ .*: model.layers.1.post_attention_layernorm"):
        check_unquantized_unchanged(fp, model, names, "broken")


def test_gptqmodel_leaves_the_hugging_face_caches_alone():
    """Importing GPTQModel 7.6 points HF_HOME and friends at a temp folder; the quantize job's later downloads
    and child processes must still use the user's cache."""
    import os
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); from qtraj.methods._gptqmodel import import_gptqmodel; "
            "import_gptqmodel(); print(sorted(k for k in set(os.environ) | set(before) "
            "if k.startswith(('HF_', 'TRANSFORMERS')) and os.environ.get(k) != before.get(k)))")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def gptq_entries() -> dict:
    """The default config with three GPTQ entries: GPTQModel with and without true_sequential, llm-compressor."""
    from qtraj.config import read_yaml, validate_config
    from tests.conftest import REPO_ROOT

    config = read_yaml(REPO_ROOT / "config" / "config.yaml")
    config["quantizations"] = {
        "gptq-w4g128-gptqmodel": {"method": "gptq", "bits": 4, "group_size": 128, "engine": "gptqmodel"},
        "gptq-w4g128": {"method": "gptq", "bits": 4, "group_size": 128},
        "gptq-w4g128-sequential-off": {"method": "gptq", "bits": 4, "group_size": 128, "engine": "gptqmodel",
                                       "options": {"true_sequential": False}},
    }
    return validate_config(config)


# The config hash (qtraj.provenance) of each entry's quantization settings as the quantize job records them,
# computed before true_sequential's default moved from the engine's code into the option schema: an entry that
# leaves the option out must keep its hash, or every finished GPTQ result would be computed again.
GPTQ_HASHES = {"gptq-w4g128-gptqmodel": "1540b3d9f162cc05", "gptq-w4g128": "42dd88676ed06063",
               "gptq-w4g128-sequential-off": "8b11256106d27915"}


def test_an_engine_default_stays_out_of_the_config_and_its_hash():
    from qtraj.config import quant_spec
    from qtraj.provenance import config_hash

    config = gptq_entries()
    for name, pinned in GPTQ_HASHES.items():
        spec = quant_spec(config, name)
        recorded = {key: spec[key] for key in ("name", "method", "bits", "group_size", "symmetric", "options",
                                               "engine")}  # what qtraj.steps.quantize hashes
        assert config_hash(recorded) == pinned, name
        assert ("true_sequential" in spec["options"]) == name.endswith("-off")


@pytest.mark.parametrize(("name", "told"), [("gptq-w4g128-gptqmodel", True), ("gptq-w4g128-sequential-off", False)])
def test_gptqmodel_is_told_true_sequential_from_the_option_schema(monkeypatch, tmp_path, name, told):
    """What GPTQModel's QuantizeConfig receives for a config entry: the schema's engine_default where the entry
    leaves the option out, the entry's value where it sets it. The fake engine stops the job right there."""
    from types import SimpleNamespace

    from qtraj.config import quant_spec
    from qtraj.methods import _gptqmodel

    class Told(Exception):
        pass

    def quantize_config(**settings):
        raise Told(settings)

    monkeypatch.setattr(_gptqmodel, "import_gptqmodel",
                        lambda: SimpleNamespace(GPTQModel=None, QuantizeConfig=quantize_config))
    spec = QuantSpec(**quant_spec(gptq_entries(), name))
    with pytest.raises(Told) as stopped:
        get_method("gptq").quantize(None, tmp_path, spec, np.zeros((1, 8), dtype=np.int64))
    assert stopped.value.args[0]["true_sequential"] is told


def reference_rtn(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest by hand, on compressed-tensors' integer grid: per group of `group_size` input features (or
    per output channel) the range [min(w, 0), max(w, 0)] sets the scale, symmetric: absmax / ((2^bits - 1) / 2)
    with levels -2^(bits-1) .. 2^(bits-1) - 1, asymmetric: (max - min) / (2^bits - 1) with an integer zero point;
    each weight is rounded to its level, clamped, and mapped back."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, -1, group_size or columns)
    low = groups.amin(dim=-1, keepdim=True).clamp(max=0)
    high = groups.amax(dim=-1, keepdim=True).clamp(min=0)
    level_min, level_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = torch.maximum(low.abs(), high) / ((level_max - level_min) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (high - low) / (level_max - level_min)
        zero = torch.round(level_min - low / scale).clamp(level_min, level_max)
    levels = torch.round(groups / scale + zero).clamp(level_min, level_max)
    return ((levels - zero) * scale).reshape(rows, columns)


RTN_GRIDS = [(4, 16, True), (3, 32, False), (4, 64, False), (3, None, True)]


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), RTN_GRIDS)
def test_rtn_equals_a_hand_written_round_to_nearest_bit_for_bit(trained_checkpoint, bits, group_size, symmetric):
    """Every quantized matrix is the reference RTN of the checkpoint's weight, bit for bit, at each group size
    (another group size, a symmetric grid for an asymmetric one, or another scale would each change some weight);
    the grid test above only counts levels, which a coarser grid also passes."""
    spec = QuantSpec(name="rtn", method="rtn", bits=bits, group_size=group_size, symmetric=symmetric)
    model, _ = quantize(trained_checkpoint, spec)
    original = linear_weights(trained_checkpoint)
    quantized_weights = linear_weights(model)
    assert quantized_weights.keys() == original.keys() and len(original) == 2 * 7
    for name, weight in original.items():
        expected = reference_rtn(weight.float(), bits, group_size, symmetric)
        assert torch.equal(quantized_weights[name], expected), name
