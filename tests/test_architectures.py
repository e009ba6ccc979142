"""Every architecture of the model catalog through the hub-family path, on tiny random-initialised models.

Per architecture: two revisions in a local hub cache (offline, the real huggingface_hub code), the family's own
tokenizer, fp evaluation with accuracy and sharpness, then every engine that can run it (RTN, GPTQ through
llm-compressor and GPTQModel, AWQ, bitsandbytes) through the same step functions the workflow's jobs call. What
must hold everywhere: finite rows; GPTQ's reconstruction error at most RTN's on every layer; the head, the
embeddings and every bias bit-identical to the checkpoint; the layer-error table naming exactly the
architecture's decoder linears. Engines that cannot run an architecture are refused by the config check.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qtraj import steps
from qtraj.config import ConfigError, validate_config
from qtraj.evaluation import load_causal_lm
from qtraj.families import DOWNLOAD_KEYS, expand_revisions, load_family, revision_lr_and_phase
from qtraj.methods import get_method
from qtraj.methods.base import options_with_defaults
from qtraj.quantization import ALL_EXPERTS
from tests.architectures import (
    ARCHITECTURES,
    DECODER_LAYERS_PATH,
    DECODER_LINEARS,
    REMOTE_ARCHITECTURE,
    isolated_remote_code,
    save_tiny_checkpoint,
)
from tests.hub_cache import add_model_folder, fake_commit

REVISIONS = ("step100", "step200")
BIASED = ("GPTNeoXForCausalLM", "GPT2LMHeadModel")
CALIBRATION = {"num_samples": 8, "seq_len": 64}
# random weights, not pretrained models: the loss check for pretrained checkpoints (qtraj.sanity) is off
EVALUATION = {"seq_len": 64, "max_blocks": 8, "batch_size": 8, "max_loss_fraction": None}
ACCURACY = {"local_tasks": {"continuation": {}}, "lm_eval_tasks": [], "num_fewshot": 0, "fewshot_seed": 0,
            "limit": None, "batch_size": 16}
SHARPNESS = {"blocks": 2, "seq_len": 32, "batch_size": 2, "iterations": 4, "tolerance": 0.1, "seed": 0}
# (name, method, bits, group size, engine); bnb 4-bit blocks are fixed at 64
QUANTIZATIONS = [
    ("rtn-w4g32", "rtn", 4, 32, "llmcompressor"),
    ("gptq-w4g32", "gptq", 4, 32, "llmcompressor"),
    ("gptq-w4g32-gptqmodel", "gptq", 4, 32, "gptqmodel"),
    ("awq-w4g32", "awq", 4, 32, "llmcompressor"),
    ("bnb-int8", "bnb", 8, None, "bitsandbytes"),
    ("bnb-nf4", "bnb", 4, 64, "bitsandbytes"),
]


def slug(architecture: str) -> str:
    return architecture.removesuffix("ForCausalLM").lower()


def family_of(architecture: str) -> dict:
    repo = f"qtraj-test/tiny-{slug(architecture)}"
    remote = architecture == REMOTE_ARCHITECTURE
    return {
        "name": f"tiny {architecture}", "repo": repo, "parameters": 2e5, "architecture": architecture,
        "trust_remote_code": remote, "tokens_per_step": 4096,
        "schedule": {"type": "cosine", "peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 200},
        "stages": {"pretraining": "pretraining"},
        # remote code runs only from pinned commits
        "revisions": [{"revision": name, "step": int(name.removeprefix("step")), "tokens": 4096 * int(name[4:]),
                       "stage": "pretraining", **({"commit": fake_commit(repo, name)} if remote else {})}
                      for name in REVISIONS],
    }


def spec_of(name, method, bits, group_size, engine) -> dict:
    """The params a quantize / evaluate job gets (config validation fills the method's option defaults)."""
    options = options_with_defaults(get_method(method).options_schema, {})
    return {"name": name, "method": method, "bits": bits, "group_size": group_size, "symmetric": True,
            "options": options, "engine": engine}


def supported(method: str, engine: str, architecture: str) -> bool:
    return architecture not in get_method(method).unsupported_architectures.get(engine, {})


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer_dir, token_stream, corpus_lines):
    """A local hub cache with two revisions of every architecture, the token files and the local task."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("architectures")
    cache = root / "hub"
    # remote code is imported from a modules cache: keep it inside the test's folder, ahead of any other
    with pytest.MonkeyPatch.context() as patch, isolated_remote_code(root / "modules"):
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.delenv("HF_TOKEN", raising=False)
        for architecture in ARCHITECTURES:
            family = family_of(architecture)
            previous = None
            for index, revision in enumerate(REVISIONS):
                folder = root / "made" / slug(architecture) / revision
                save_tiny_checkpoint(architecture, folder, tokenizer_dir, seed=index, perturb_from=previous)
                add_model_folder(cache, family["repo"], revision, folder)
                previous = folder
        np.save(root / "validation.npy", token_stream[:20_000])
        np.save(root / "calibration.npy", token_stream[-20_000:])
        validation_text = root / "validation.jsonl"
        validation_text.write_text("\n".join(corpus_lines[40:46]) + "\n")
        steps.build_task(str(validation_text), "continuation",
                         {"kind": "continuation", "items": 24, "context_words": 8, "choice_words": 3, "choices": 4,
                          "seed": 0}, str(root / "continuation.jsonl"))
        yield root


def run_family(root, architecture):
    """The jobs of one family, in the order the workflow runs them; returns the rows they wrote."""
    family_file = root / "families" / f"{slug(architecture)}.yaml"
    family_file.parent.mkdir(exist_ok=True)
    family_file.write_text(yaml.safe_dump(family_of(architecture)))
    family = load_family(family_file)
    revisions = expand_revisions(family)
    out = root / "results" / slug(architecture)
    tokenizer = out / "tokenizer"
    # no `tokenizer:` in the family file: the first selected revision's own, as the workflow does
    source = {"repo": family["repo"], "revision": None, "trust_remote_code": family["trust_remote_code"],
              "gated": False}
    steps.download_tokenizer(source, str(tokenizer), default_revision=revisions[0].commit or revisions[0].revision)
    tasks = {"continuation": str(root / "continuation.jsonl")}
    rows = {"fp": [], "results": [], "layers": {}, "accuracy": []}
    for revision in revisions:
        checkpoint = out / "checkpoints" / revision.revision
        source = {"family": {key: family[key] for key in DOWNLOAD_KEYS}, "revision": asdict(revision),
                  **dict(zip(("lr", "phase"), revision_lr_and_phase(family, revision), strict=True))}
        steps.download_checkpoint(slug(architecture), source, str(tokenizer), str(checkpoint))
        steps.evaluate_fp(str(checkpoint), str(root / "validation.npy"), EVALUATION,
                          str(out / f"fp-{revision.revision}.parquet"), ACCURACY, tasks,
                          str(out / f"acc-{revision.revision}.parquet"))
        rows["fp"] += pq.read_table(out / f"fp-{revision.revision}.parquet").to_pylist()
        rows["accuracy"] += pq.read_table(out / f"acc-{revision.revision}.parquet").to_pylist()
    last = out / "checkpoints" / revisions[-1].revision
    steps.sharpness(str(last), str(root / "validation.npy"), SHARPNESS, str(out / "sharpness.parquet"))
    rows["sharpness"] = pq.read_table(out / "sharpness.parquet").to_pylist()
    rows["models"] = {}
    for name, method, bits, group_size, engine in QUANTIZATIONS:
        if not supported(method, engine, architecture):
            continue
        spec = spec_of(name, method, bits, group_size, engine)
        with kept_models(rows["models"], name):
            steps.quantize_and_evaluate(
                checkpoint_dir=str(last), spec=spec, fp_eval=str(out / f"fp-{revisions[-1].revision}.parquet"),
                validation_tokens=str(root / "validation.npy"), calibration_tokens=str(root / "calibration.npy"),
                evaluation=EVALUATION, calibration=CALIBRATION, out_file=str(out / f"q-{name}.parquet"),
                layer_errors_file=str(out / f"layers-{name}.parquet"))
        rows["results"] += pq.read_table(out / f"q-{name}.parquet").to_pylist()
        rows["layers"][name] = pq.read_table(out / f"layers-{name}.parquet").to_pylist()
    return rows, out


@contextlib.contextmanager
def kept_models(models: dict, name: str):
    """Keep the quantized model the job evaluates (the real `quantize_model`, its result recorded), so the test can
    compare it with the checkpoint itself, independently of the job's own check."""
    import qtraj.quantization

    real = qtraj.quantization.quantize_model

    def recording(*args, **kwargs):
        model, info = real(*args, **kwargs)
        if not get_method(info["method"]).quantizes_at_load:  # bitsandbytes' packed weights are not comparable
            models[name] = model
        return model, info

    qtraj.quantization.quantize_model = recording
    try:
        yield
    finally:
        qtraj.quantization.quantize_model = real


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_engine_measures_every_architecture_correctly(hub, architecture):
    rows, out = run_family(hub, architecture)  # the hub fixture keeps the cache offline and in its folder

    assert [row["checkpoint"] for row in rows["fp"]] == list(REVISIONS)
    assert all(np.isfinite(row["loss_fp"]) for row in rows["fp"])
    assert {row["task"] for row in rows["accuracy"]} == {"continuation"}
    assert np.isfinite(rows["sharpness"][0]["top_eigenvalue"])
    expected_engines = [q for q in QUANTIZATIONS if supported(q[1], q[4], architecture)]
    assert [row["quantization"] for row in rows["results"]] == [q[0] for q in expected_engines]
    for row in rows["results"]:
        assert np.isfinite(row["loss_q"]) and np.isfinite(row["delta_q_loss"]), row["quantization"]
        assert row["engine"] == dict((q[0], q[4]) for q in QUANTIZATIONS)[row["quantization"]]
        # an MoE row says how its experts were calibrated (RTN: not at all)
        expected_calibration = None if architecture != "OlmoeForCausalLM" else (
            "no calibration (round to nearest)" if row["method"] == "rtn" else ALL_EXPERTS)
        assert row["expert_calibration"] == expected_calibration, row["quantization"]

    # the layer errors name exactly the architecture's decoder linears, for every engine
    layers = DECODER_LAYERS_PATH[architecture]
    decoder_linears = {f"{layers}.{index}.{suffix}" for index in range(2) for suffix in DECODER_LINEARS[architecture]}
    for name, table in rows["layers"].items():
        assert {row["layer"] for row in table} == decoder_linears, name
        assert all(np.isfinite(row["recon_error"]) and row["weight_error"] > 0 for row in table), name

    # GPTQ's whole point: no layer reconstructs its inputs worse than round-to-nearest on the same grid
    rtn = {row["layer"]: row["recon_error"] for row in rows["layers"]["rtn-w4g32"]}
    gptq = {row["layer"]: row["recon_error"] for row in rows["layers"]["gptq-w4g32"]}
    assert all(gptq[layer] <= rtn[layer] * (1 + 1e-6) for layer in rtn), {k: (gptq[k], rtn[k]) for k in rtn}

    # head, embeddings, norms and biases of every evaluated fake-quant model are the checkpoint's, bit for bit (the
    # job checks it too; this compares with a fresh load of the checkpoint)
    fp = load_causal_lm(out / "checkpoints" / REVISIONS[-1])
    quantized = get_method("rtn").quantized_matrices(fp)
    quantized_keys = {matrix.key for matrix in quantized.values()}
    assert rows["models"].keys() == {q[0] for q in expected_engines if q[1] != "bnb"}
    for name, model in sorted(rows["models"].items()):
        fp_state, q_state = fp.state_dict(), model.state_dict()
        untouched = [key for key in fp_state if key not in quantized_keys]
        assert untouched and all(torch.equal(fp_state[key], q_state[key]) for key in untouched), name
        # GPT-NeoX (Pythia) and GPT-2 have biased layers: fake-quant folders used to drop them
        biases = [key for key in untouched if key.endswith(".bias") and key.removesuffix(".bias") in quantized]
        assert bool(biases) == (architecture in BIASED), name
        assert all(fp_state[key].abs().sum() > 0 for key in biases)
        assert torch.equal(fp.get_output_embeddings().weight, model.get_output_embeddings().weight)
        assert torch.equal(fp.get_input_embeddings().weight, model.get_input_embeddings().weight)
        assert all(not torch.equal(matrix.read(fp_state), matrix.read(q_state)) for matrix in quantized.values())


@pytest.mark.parametrize(("architecture", "quantization"), [
    ("GPTNeoXForCausalLM", {"method": "awq", "bits": 4, "group_size": 32}),
    ("Olmo2ForCausalLM", {"method": "awq", "bits": 4, "group_size": 32}),
])
def test_an_engine_that_cannot_run_an_architecture_is_refused_before_any_job(tmp_path, architecture, quantization):
    families = tmp_path / "families"
    families.mkdir()
    (families / "tiny.yaml").write_text(yaml.safe_dump(family_of(architecture)))
    config = {"families_dir": str(families), "families": {"tiny": {}}, "quantizations": {"q": quantization}}
    with pytest.raises(ConfigError, match=rf"quantizations.q' on 'tiny': awq through llmcompressor cannot quantize "
                                          rf"{architecture}"):
        validate_config(config)


# --- invariances: the same weights in two forms give the same numbers ---------------------------------------------

def _quantized_numbers(fp, folder, spec, blocks, calibration):
    """(validation loss, per-matrix layer errors, dequantized matrices) of one in-memory quantization."""
    from qtraj.evaluation import cross_entropy
    from qtraj.layer_errors import capture_inputs, layer_errors
    from qtraj.methods import QuantSpec

    method = get_method(spec["method"])
    matrices = method.quantized_matrices(fp)
    inputs = capture_inputs(fp, matrices, calibration, 8, max_rows=calibration.size)
    model = method.quantize(fp, folder, QuantSpec(**spec), None if spec["method"] == "rtn" else calibration)
    errors = {error.layer: error for error in layer_errors(fp, model, matrices, inputs)}
    state = model.state_dict()
    weights = {name: matrix.read(state) for name, matrix in matrices.items()}
    return cross_entropy(model, blocks, 8).loss, errors, weights


@pytest.fixture(scope="module")
def invariance_data(tmp_path_factory, tokenizer_dir, token_stream):
    from qtraj.tokenization import token_blocks

    root = tmp_path_factory.mktemp("invariance")
    blocks = token_blocks(token_stream[:20_000], 65, 8)
    calibration = token_blocks(token_stream[-20_000:], 64, 8)
    return root, blocks, calibration


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gpt2_conv1d_and_the_same_weights_as_linear_give_identical_numbers(invariance_data, tokenizer_dir, method):
    """transformers' Conv1D stores [in, out]; qtraj reads it as [out, in]: the same model with each Conv1D
    replaced by the nn.Linear computing the same function must give the same ΔQ L and layer errors, bit for bit."""
    import copy

    from qtraj.evaluation import cross_entropy
    from qtraj.methods._llmcompressor import conv1d_as_linear

    root, blocks, calibration = invariance_data
    folder = save_tiny_checkpoint("GPT2LMHeadModel", root / "gpt2", tokenizer_dir, seed=3)
    conv = load_causal_lm(folder)
    linear = copy.deepcopy(conv)
    conv1d_as_linear(linear, get_method("rtn").quantized_matrices(conv))
    assert {matrix.layout for matrix in get_method("rtn").quantized_matrices(linear).values()} == {"linear"}
    assert cross_entropy(conv, blocks, 8).loss == pytest.approx(cross_entropy(linear, blocks, 8).loss, rel=1e-6)
    spec = spec_of(f"{method}-w4g32", method, 4, 32, "llmcompressor")
    loss_conv, errors_conv, weights_conv = _quantized_numbers(conv, folder, spec, blocks, calibration)
    loss_linear, errors_linear, weights_linear = _quantized_numbers(linear, folder, spec, blocks, calibration)
    assert weights_conv.keys() == weights_linear.keys() and len(weights_conv) == 8
    assert all(torch.equal(weights_conv[name], weights_linear[name]) for name in weights_conv)
    assert loss_conv == pytest.approx(loss_linear, rel=1e-6)
    for name, error in errors_conv.items():
        assert error.weight_error == errors_linear[name].weight_error, name
        assert error.recon_error == pytest.approx(errors_linear[name].recon_error, rel=1e-5), name


def test_fused_experts_and_the_same_weights_as_per_expert_linears_give_identical_numbers(invariance_data,
                                                                                         tokenizer_dir):
    """OLMoE's fused experts vs the same weights as one nn.Linear per expert matrix (llm-compressor's own
    `linearize_moe`): RTN gives identical weights and loss; GPTQ (every expert calibrated on every token in both
    forms) agrees to the documented tolerance."""
    import copy

    from llmcompressor.modeling.moe.linearize import linearize_moe

    from qtraj.evaluation import cross_entropy

    root, blocks, calibration = invariance_data
    folder = save_tiny_checkpoint("OlmoeForCausalLM", root / "olmoe", tokenizer_dir, seed=4)
    fused = load_causal_lm(folder)
    split = copy.deepcopy(fused)
    linearize_moe(split)
    assert {matrix.layout for matrix in get_method("rtn").quantized_matrices(split).values()} == {"linear"}
    assert set(get_method("rtn").quantized_matrices(split)) == set(get_method("rtn").quantized_matrices(fused))
    assert cross_entropy(fused, blocks, 8).loss == pytest.approx(cross_entropy(split, blocks, 8).loss, rel=1e-6)

    rtn = spec_of("rtn-w4g32", "rtn", 4, 32, "llmcompressor")
    loss_fused, errors_fused, weights_fused = _quantized_numbers(fused, folder, rtn, blocks, calibration)
    loss_split, errors_split, weights_split = _quantized_numbers(split, folder, rtn, blocks, calibration)
    assert all(torch.equal(weights_fused[name], weights_split[name]) for name in weights_fused)
    assert loss_fused == pytest.approx(loss_split, rel=1e-6)
    assert all(errors_fused[name].weight_error == errors_split[name].weight_error for name in errors_fused)
    assert {errors_fused[name].input_rows > 0 for name in errors_fused} == {True}  # every expert saw tokens

    gptq = spec_of("gptq-w4g32", "gptq", 4, 32, "llmcompressor")
    loss_fused, _, weights_fused = _quantized_numbers(fused, folder, gptq, blocks, calibration)
    loss_split, _, weights_split = _quantized_numbers(split, folder, gptq, blocks, calibration)
    # GPTQ's Hessians come from the same tokens in both forms; only float summation order may differ
    assert loss_fused == pytest.approx(loss_split, rel=1e-4)
    differing = [name for name in weights_fused if not torch.equal(weights_fused[name], weights_split[name])]
    assert len(differing) <= len(weights_fused) // 4, differing
