"""Tiny random-initialised checkpoints of every architecture in qtraj's model catalog, for the tests.

Each architecture keeps the traits of its real family that a quantization pipeline can trip over (fused or
separate projections, biases, tied or untied heads, q/k norms, non-parametric norms, a two-matrix MLP with
xIELU, parallel residual, partial rotary, no-RoPE layers, GQA, remote code) at widths of 64, so a whole
pipeline runs on each in seconds on a CPU. Shapes are chosen so that every decoder Linear has in_features
divisible by 32 and 64 (the group sizes the tests use) and out_features divisible by 32 (GPTQModel packs 32-bit
words along the output); `save_tiny_checkpoint` checks that, so an override that breaks it fails at once.

The remote-code architecture stands in for open-sci-ref (`OpensciForCausalLM`, which needs trust_remote_code):
a Llama under a model_type transformers does not know ("tinyremote"), shipped as `configuration_tinyremote.py`
and `modeling_tinyremote.py` inside the checkpoint folder and found through `auto_map`. Its class keeps the
catalog's architecture name, so anything that looks an architecture up by class name (llm-compressor's AWQ
mappings) sees what it would see for the real family. Pinning its commit is the caller's business.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch

REMOTE_ARCHITECTURE = "OpensciForCausalLM"
REMOTE_MODEL_TYPE = "tinyremote"
REMOTE_CODE_FILES = ("configuration_tinyremote.py", "modeling_tinyremote.py")

# Group sizes the tests quantize with, and GPTQModel's packing width along the output dimension.
GROUP_SIZES = (32, 64)
PACK_WIDTH = 32

# hidden 64, 2 layers; pad_token_id None because transformers zeroes the embedding row of the padding id at
# init, and qtraj's tokenizer pads with its end-of-text token: a zero eos row would make every tied model's eos
# logit exactly 0. bos/eos 0 is the id of <|endoftext|> in qtraj's BPE (its only special token, added first).
_COMMON = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": None,
}

# architecture -> (transformers config class, its shape). Intermediate sizes are the multiple of 64 nearest to
# 64 x the real intermediate / hidden ratio. GQA families keep GQA at ratio 2 (the real ratio 4 would leave
# k/v with 16 outputs, under the packing width, or need hidden != heads x head_dim).
_SHAPES: dict[str, tuple[str, dict]] = {
    # LLM360/Amber (7B): 4096 / 11008 (x2.69), 32 heads MHA, untied
    "LlamaForCausalLM": ("LlamaConfig", {
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 192,
        "tie_word_embeddings": False,
    }),
    # SmolLM3-3B: 2048 / 11008 (x5.38), 16 heads / 4 kv, tied; the real model drops RoPE in every 4th layer,
    # which two layers would never reach, so layer 2 of 2 is the NoPE one here (1 = uses RoPE)
    "SmolLM3ForCausalLM": ("SmolLM3Config", {
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 320,
        "tie_word_embeddings": True, "no_rope_layers": [1, 0],
    }),
    # OLMo-2 1B: 2048 / 8192 (x4), 16 heads MHA, q/k RMSNorms over all heads, norms after attention and MLP
    "Olmo2ForCausalLM": ("Olmo2Config", {
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
        "tie_word_embeddings": False,
    }),
    # OLMo-1B-hf: 2048 / 8192 (x4), 16 heads MHA, layer norms without parameters, tied, no qkv clipping
    "OlmoForCausalLM": ("OlmoConfig", {
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
        "tie_word_embeddings": True, "clip_qkv": None,
    }),
    # Apertus-8B: 4096 / 21504 (x5.25), 32 heads / 8 kv, xIELU between up_proj and down_proj (no gate), per-head
    # q/k norms, untied, llama3 RoPE scaled x8; its default original context (8192) would exceed the tiny
    # max_position_embeddings (transformers warns), so it is scaled down with the context: 128 / 8
    "ApertusForCausalLM": ("ApertusConfig", {
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 320,
        "hidden_act": "xielu", "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                            "original_max_position_embeddings": 16, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }),
    # Pythia (70m: 512 / 2048, 8 heads of 64): biased Linears, fused query_key_value, parallel residual, RoPE on
    # a quarter of each head (2 heads of 32, so 8 rotary dims), a separate output head saved as embed_out
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", {
        "num_attention_heads": 2, "intermediate_size": 256, "hidden_act": "gelu", "use_parallel_residual": True,
        "attention_bias": True, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    }),
    # GPT-2 (nanoGPT-style runs): transformers' Conv1D layers (weights stored [in, out]), fused c_attn, biases,
    # learned positions, tied head
    "GPT2LMHeadModel": ("GPT2Config", {
        "n_head": 4, "n_inner": 256, "tie_word_embeddings": True, "activation_function": "gelu_new",
    }),
    # Gemma 3 (270M: 640 / 2048, 4 heads / 1 kv of 256): offset norms (1 + w), q/k norms, sliding and full
    # attention layers, tied head
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 256,
        "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True,
    }),
    # OLMoE-1B-7B (2048, 64 experts of 1024, top 8): fused experts (3-D gate_up_proj / down_proj), a router per
    # layer, q/k norms, untied; 4 experts of 64, top 2
    "OlmoeForCausalLM": ("OlmoeConfig", {
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64, "num_experts": 4,
        "num_experts_per_tok": 2, "tie_word_embeddings": False,
    }),
    # open-sci-ref 1.7B stand-in: a Llama (its weights are built as one), untied (the real tying is unverified)
    REMOTE_ARCHITECTURE: ("LlamaConfig", {
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
        "tie_word_embeddings": False,
    }),
}

ARCHITECTURES: tuple[str, ...] = tuple(_SHAPES)

# Written down from the transformers 5.17 modeling files, not computed: a module finder is tested against it.
_LLAMA_LINEARS = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
}
DECODER_LINEARS: dict[str, set[str]] = {
    "LlamaForCausalLM": set(_LLAMA_LINEARS),
    "SmolLM3ForCausalLM": set(_LLAMA_LINEARS),
    "Olmo2ForCausalLM": set(_LLAMA_LINEARS),
    "OlmoForCausalLM": set(_LLAMA_LINEARS),
    "ApertusForCausalLM": {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.up_proj", "mlp.down_proj",
    },
    "GPTNeoXForCausalLM": {
        "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
    },
    REMOTE_ARCHITECTURE: set(_LLAMA_LINEARS),
    "GPT2LMHeadModel": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "Gemma3ForCausalLM": set(_LLAMA_LINEARS),
    # one row per expert matrix: the names llm-compressor and GPTQModel give the experts they split out
    "OlmoeForCausalLM": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    | {f"mlp.experts.{expert}.{projection}" for expert in range(4) for projection in ("gate_proj", "up_proj",
                                                                                       "down_proj")},
}

# Where the decoder blocks sit (an nn.ModuleList), so `f"{path}.{index}.{suffix}"` names every decoder Linear.
DECODER_LAYERS_PATH: dict[str, str] = {
    architecture: {"GPTNeoXForCausalLM": "gpt_neox.layers", "GPT2LMHeadModel": "transformer.h"}.get(
        architecture, "model.layers")
    for architecture in ARCHITECTURES
}

_REMOTE_CONFIGURATION_SOURCE = '''\
"""Test stand-in for a model family shipped as remote code: a Llama under a model_type transformers lacks."""

from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
'''

_REMOTE_MODELING_SOURCE = f'''\
"""Test stand-in for a model family shipped as remote code: a Llama under a model_type transformers lacks."""

from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class {REMOTE_ARCHITECTURE}(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
    "AutoModelForCausalLM": f"modeling_tinyremote.{REMOTE_ARCHITECTURE}",
}


def _shape_of(architecture: str) -> tuple[str, dict]:
    if architecture not in _SHAPES:
        raise KeyError(f"architecture {architecture!r} has no tiny model; known: {', '.join(ARCHITECTURES)}")
    return _SHAPES[architecture]


def _transformers_config(architecture: str, vocab_size: int, overrides: dict):
    import transformers

    config_class_name, shape = _shape_of(architecture)
    config_class = getattr(transformers, config_class_name)
    return config_class(vocab_size=vocab_size, **{**_COMMON, **shape, **overrides})


def tiny_config(architecture: str, vocab_size: int, **overrides):
    """The tiny configuration of `architecture` with `vocab_size` tokens; `overrides` replace any field.

    A transformers `PretrainedConfig` for the six native architectures. For the remote-code one
    (`REMOTE_ARCHITECTURE`) a plain dict, the contents of its config.json (model_type "tinyremote", `auto_map`):
    its config class exists only inside a checkpoint folder, so build the folder with `save_tiny_checkpoint`
    and load it with `trust_remote_code=True` to get a model.
    """
    config = _transformers_config(architecture, vocab_size, overrides)
    if architecture != REMOTE_ARCHITECTURE:
        return config
    return {**config.to_dict(), "model_type": REMOTE_MODEL_TYPE, "architectures": [REMOTE_ARCHITECTURE],
            "auto_map": dict(_REMOTE_AUTO_MAP)}


def _vary_norms_and_biases(model: torch.nn.Module, generator: torch.Generator, initializer_range: float) -> None:
    """Move norm weights off 1 and biases off 0 (transformers initialises them so).

    At their init values a pipeline that drops or re-initialises them when saving a quantized model would go
    unnoticed, and so would an AWQ scale folded into (or taken back out of) a norm the wrong way round.
    Linear and embedding matrices keep transformers' N(0, initializer_range) init.
    """
    matrix_modules = (torch.nn.Linear, torch.nn.Embedding)
    matrices = {id(module.weight) for module in model.modules() if isinstance(module, matrix_modules)}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if id(parameter) in matrices:
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32).to(parameter.dtype)
            if name.endswith("bias"):
                parameter.add_(noise * initializer_range)
            elif not parameter.any():  # Gemma's offset norms (1 + w) start at w = 0: small, not zero
                parameter.add_(0.1 * noise)
            else:  # norm weights, xIELU's alpha_p / alpha_n
                parameter.mul_(1 + 0.1 * noise)


def _perturb(model: torch.nn.Module, generator: torch.Generator, relative_noise: float) -> None:
    """Add Gaussian noise of `relative_noise` times each tensor's root mean square: a nearby "later revision"."""
    with torch.no_grad():
        for parameter in model.parameters():  # tied weights appear once, so they stay tied
            rms = parameter.float().pow(2).mean().sqrt().clamp_min(1e-8)
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((noise * relative_noise * rms).to(parameter.dtype))


def decoder_linear_shape_problems(model: torch.nn.Module) -> list[str]:
    """Decoder Linears whose shapes the quantizers cannot group or pack (the output head is not quantized)."""
    head = model.get_output_embeddings()
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        for group_size in GROUP_SIZES:
            if module.in_features % group_size:
                problems.append(f"{name}: in_features {module.in_features} is not a multiple of {group_size}")
        if module.out_features % PACK_WIDTH:
            problems.append(f"{name}: out_features {module.out_features} is not a multiple of {PACK_WIDTH}")
    return problems


def _relabel_as_remote(out_dir: Path) -> None:
    """Turn a saved Llama folder into the remote-code model: config.json names the custom classes, and the code
    that defines them sits beside the weights (the state-dict keys are the same)."""
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type=REMOTE_MODEL_TYPE, architectures=[REMOTE_ARCHITECTURE], auto_map=dict(_REMOTE_AUTO_MAP))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / REMOTE_CODE_FILES[0]).write_text(_REMOTE_CONFIGURATION_SOURCE)
    (out_dir / REMOTE_CODE_FILES[1]).write_text(_REMOTE_MODELING_SOURCE)


def _load_source_revision(architecture: str, folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    is_remote = architecture == REMOTE_ARCHITECTURE
    # the remote code in a folder this module wrote is this module's own, so trusting it is safe
    saved = AutoConfig.from_pretrained(str(folder), trust_remote_code=is_remote).architectures
    if saved != [architecture]:
        raise ValueError(f"perturb_from {folder}: holds a {saved} checkpoint, not {architecture!r}; "
                         f"pass a folder written by save_tiny_checkpoint({architecture!r}, ...)")
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=is_remote)


@contextlib.contextmanager
def isolated_remote_code(modules_dir: str | Path):
    """Remote code imported from `modules_dir` (not the user's ~/.cache), and forgotten afterwards. transformers
    imports it as the package `transformers_modules`, found through sys.path, where it appends each modules folder
    it is given once: a folder an earlier test used would be searched first, and the package, once imported, keeps
    pointing there. So: this folder first on sys.path, the package forgotten before and after."""
    from transformers import dynamic_module_utils

    def forget() -> None:
        for name in [name for name in sys.modules if name.split(".")[0] == "transformers_modules"]:
            del sys.modules[name]

    forget()
    original = dynamic_module_utils.HF_MODULES_CACHE
    dynamic_module_utils.HF_MODULES_CACHE = str(modules_dir)
    sys.path.insert(0, str(modules_dir))
    try:
        yield
    finally:
        dynamic_module_utils.HF_MODULES_CACHE = original
        while str(modules_dir) in sys.path:
            sys.path.remove(str(modules_dir))
        forget()


def save_tiny_checkpoint(architecture: str, out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0,
                         perturb_from: str | Path | None = None, *, relative_noise: float = 0.05,
                         config_overrides: dict | None = None) -> Path:
    """Write a complete model folder of the tiny `architecture`; returns `out_dir`.

    The folder holds safetensors weights (via `save_pretrained`), config.json, generation_config.json with the
    tokenizer's bos/eos ids, the tokenizer's files, and for the remote-code architecture its two .py files.
    The vocabulary and the config's bos/eos ids are the tokenizer's. Deterministic given `seed` (the global
    torch RNG is left untouched).

    With `perturb_from` (a folder this function wrote for the same architecture) the weights are that folder's
    plus Gaussian noise of `relative_noise` x each tensor's RMS, drawn from `seed`: a "later revision" that
    differs from the first everywhere but stays close to it. Its config is kept; `config_overrides` then
    does not apply.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    generator = torch.Generator().manual_seed(seed)
    if perturb_from is None:
        # weights are built as plain transformers models; the remote architecture as the Llama it subclasses
        special_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = _transformers_config(architecture, len(tokenizer), {**special_ids, **(config_overrides or {})})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _vary_norms_and_biases(model, generator, config.initializer_range)
    else:
        model = _load_source_revision(architecture, Path(perturb_from))
        _perturb(model, generator, relative_noise)

    problems = decoder_linear_shape_problems(model)
    if problems:
        raise ValueError(f"tiny {architecture}: shapes the quantizers cannot handle: {'; '.join(problems)}; "
                         "keep hidden, intermediate and heads x head_dim multiples of 64, k/v outputs of 32")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if architecture == REMOTE_ARCHITECTURE:
        _relabel_as_remote(out_dir)
    for item in tokenizer_dir.iterdir():
        # a tokenizer folder saved from a model would carry that model's config.json: never let it win
        if item.is_file() and not (out_dir / item.name).exists():
            shutil.copy2(item, out_dir / item.name)
    return out_dir
