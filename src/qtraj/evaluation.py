"""Validation cross-entropy of a model on a fixed token set."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtraj.joblog import Progress

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A model's loss is NaN or infinite: a broken checkpoint or a quantization that destroyed it."""


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean next-token cross-entropy in nats
    tokens: int  # number of scored predictions
    classes: int | None = None  # size of the distribution scored (the logits' last dimension): uniform = ln(classes)
    # mean loss of each validation block, in block order: the unit a paired bootstrap resamples (qtraj.science);
    # every block scores the same number of tokens, so their mean is `loss`
    block_losses: tuple[float, ...] = ()

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_map(device: torch.device) -> str:
    """Where from_pretrained puts a model: spread over all GPUs the job was given when it has several (a model
    too big for one, sized by qtraj.resources), else the one device."""
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return "auto"
    return device.type


class LoadError(RuntimeError):
    """A model folder does not load into its architecture exactly (missing, unexpected or misshapen weights)."""


def check_loading_info(folder: str | Path, info: dict) -> None:
    """Refuse a load that left parameters at their random initialisation or dropped stored ones: transformers
    only prints such a report, and every number computed from the model would be silently wrong."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in info.get(kind) or ())
        if keys:
            more = ", ..." if len(keys) > 6 else ""
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(keys[:6])}{more})")
    problems += [str(message) for message in info.get("error_msgs") or ()]
    if problems:
        raise LoadError(f"the model folder {folder} does not match its architecture: {'; '.join(problems)}. If the "
                        "folder was written by qtraj, delete it and rerun; if it came from elsewhere, its weights "
                        "were saved for another model class or are incomplete")


def load_causal_lm(folder: str | Path, device: torch.device | None = None, **kwargs):
    """Load a Hugging Face model folder for evaluation (fp32 on CPU, bf16 on GPU), refusing any folder whose weights
    do not fill the architecture exactly. `kwargs` go to `from_pretrained` (e.g. a quantization config)."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    from qtraj.checkpoints import trusts_remote_code

    placement = device_map(device)
    options = {"dtype": dtype, **({"device_map": "auto"} if placement == "auto" else {}), **kwargs}
    refuse_untrusted_code(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), trust_remote_code=trusts_remote_code(folder), output_loading_info=True, **options)
    except Exception as error:  # safetensors, OSError, config errors: all mean this folder is unusable
        raise RuntimeError(
            f"could not load the model folder {folder}: {type(error).__name__}: {error}. {how_to_replace(folder)}"
        ) from error
    check_loading_info(folder, info)
    check_finite_weights(folder, model.state_dict())
    if placement != "auto" and "quantization_config" not in kwargs:
        model = model.to(device)
    return model.eval()


def check_finite_weights(folder: str | Path, state: dict) -> None:
    """Refuse NaN or infinite weights: every number computed from them would be NaN or meaningless, so the first
    job that reads a checkpoint stops, naming it."""
    broken = [name for name, tensor in state.items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise LoadError(f"the model folder {folder} holds NaN or infinite weights in {len(broken)} tensors "
                        f"({', '.join(broken[:5])}). {how_to_replace(folder)}")


def check_finite_files(folder: str | Path) -> None:
    """`check_finite_weights` over a folder's safetensors files, one tensor in memory at a time."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                check_finite_weights(folder, {key: handle.get_tensor(key)})


def how_to_replace(folder: str | Path) -> str:
    """What to delete so that a broken model folder is rebuilt: the folder itself, or, when its files are links
    into a local Hugging Face hub cache or someone's checkpoint folder, the files they point to (deleting only the
    links would bring back the same bad files)."""
    folder = Path(folder)
    linked = sorted({str(item.resolve()) for item in folder.iterdir() if item.is_symlink()}) if folder.is_dir() else []
    if not linked:
        return "If it is incomplete or corrupt, delete it and rerun so the pipeline rebuilds it"
    cached = [path for path in linked if "/blobs/" in path]
    if cached:
        repo_dir = Path(cached[0]).parent.parent
        snapshot = next((item.readlink().parent.name for item in folder.iterdir() if item.is_symlink()
                         and "/snapshots/" in str(item.readlink())), None)
        commit = snapshot or _commit_of(folder) or "<the revision's commit>"
        return (f"Its files are links into the local hub cache ({repo_dir}): remove that revision from the cache "
                f"(`hf cache rm {commit}`), then rerun so it is downloaded again")
    return (f"Its files are links to {Path(linked[0]).parent}, which qtraj never modifies: replace the checkpoint "
            "there (or leave it out of the config's selection), then rerun")


def _commit_of(folder: Path) -> str | None:
    import json

    from qtraj.checkpoints import METADATA_FILE

    try:
        return json.loads((folder / METADATA_FILE).read_text()).get("commit")
    except (OSError, ValueError):
        return None


def refuse_untrusted_code(folder: str | Path) -> None:
    """A folder whose config asks for its own Python code (`auto_map`) loads only where qtraj decided to trust it
    (a hub family whose file sets trust_remote_code with a pinned commit); say so instead of transformers' prompt."""
    import json

    from qtraj.checkpoints import trusts_remote_code

    config = Path(folder, "config.json")
    try:
        settings = json.loads(config.read_text()) if config.is_file() else {}
    except ValueError as error:
        raise LoadError(f"the model folder {folder} has a config.json that is not valid JSON ({error}). "
                        f"{how_to_replace(folder)}") from error
    if "auto_map" in settings and not trusts_remote_code(folder):
        raise LoadError(f"the model folder {folder} needs its own Python code (config.json has an auto_map), which "
                        "qtraj runs only for hub families whose family file sets `trust_remote_code: true` with a "
                        "pinned `commit:` for every revision used; review the code, then set both")


def model_skeleton(folder: str | Path):
    """The model class of a folder, built on the meta device (no memory, no weights): enough to ask it which
    modules exist (e.g. what a method quantizes) before an engine that decides that itself has run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtraj.checkpoints import trusts_remote_code

    trust = trusts_remote_code(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)


# Float32 logits one chunk of scored positions may hold. The loss needs the log-softmax of every position, but
# not of all at once: a batch of 4 x 2048 positions of a 262k vocabulary would be 8.6 GB of float32 logits (plus
# the model-dtype copy and the log-softmax's own), a chunk of 256 MiB is 256 positions of that vocabulary and a
# whole batch of a small one. Chunks only change the order of a float sum.
LOGITS_CHUNK_BYTES = 2**28


def chunk_positions(classes: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """How many positions' float32 logits fit in `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // (4 * classes))


# What a causal LM's forward does to its head's output, by the config key that turns it on (transformers applies
# these after lm_head, so a loss computed from the hidden states must apply them too): Gemma 2/3's tanh
# soft-capping, Granite's division and Cohere's multiplication. An architecture with another rule is caught by
# head_split_agrees and scored from its own full logits instead.
def _soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


LOGIT_TRANSFORMS = {
    "final_logit_softcapping": _soft_cap,
    "logits_scaling": lambda logits, scale: logits / scale,
    "logit_scale": lambda logits, scale: logits * scale,
}


def _decoder_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states: its output head, then the transforms its forward applies."""
    logits = model.get_output_embeddings()(hidden)
    config = _decoder_config(model)
    for key, transform in LOGIT_TRANSFORMS.items():
        value = getattr(config, key, None)
        if value is not None:
            logits = transform(logits, value)
    return logits


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output before the head (transformers' get_decoder: `model.model`, GPT-2's `transformer`)."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def head_split_agrees(model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether hidden states -> head_logits gives the model's own logits on `input_ids` (a few positions suffice:
    the head is applied position by position). False for a model whose decoder or head transformers cannot name,
    or whose forward does something after the head that LOGIT_TRANSFORMS does not know: its loss then comes
    from its full logits, so the split can cost memory but never a wrong number."""
    try:
        decoder = model.get_decoder()
        if decoder is model or model.get_output_embeddings() is None:
            return False
        split = head_logits(model, final_hidden_states(model, input_ids)).float()
    except (AttributeError, NotImplementedError, TypeError, ValueError) as error:
        log.warning("%s: no decoder/head split (%s); the loss uses full logits", type(model).__name__, error)
        return False
    full = model(input_ids=input_ids, use_cache=False).logits.float()
    tolerance = 1e-5 if full.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 2e-2
    agrees = split.shape == full.shape and torch.allclose(split, full, rtol=tolerance, atol=tolerance)
    if not agrees:
        log.warning("%s: its head applied to its hidden states does not give its logits; the loss uses full "
                    "logits (more memory, same number)", type(model).__name__)
    return agrees


def next_token_loss_sum(model: torch.nn.Module, batch: torch.Tensor, split_head: bool,
                        chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed next-token cross-entropy of a batch of blocks (inputs + 1 target each), in float64; the same sum per
    block (detached: a number to report, not to differentiate); and the number of classes scored. With
    `split_head` the logits exist one chunk of positions at a time (float32 log-softmax per chunk), so memory holds
    the weights, the hidden states and one chunk whatever the vocabulary; without it the model's full logits are
    made once and only their float32 copies are chunked. Differentiable (sharpness)."""
    targets = batch[:, 1:].reshape(-1)
    if split_head:
        hidden = final_hidden_states(model, batch[:, :-1])
        positions = hidden.reshape(-1, hidden.shape[-1])
        classes = model.get_output_embeddings().out_features
        logits_of = lambda rows: head_logits(model, positions[rows])  # noqa: E731 - one line, used once below
    else:
        logits = model(input_ids=batch[:, :-1]).logits  # any module with .logits: no keyword it may not take
        classes = logits.shape[-1]
        flat = logits.reshape(-1, classes)
        logits_of = lambda rows: flat[rows]  # noqa: E731
    step = chunk_positions(classes, chunk_bytes)
    block_of_position = torch.arange(len(targets), device=batch.device) // (batch.shape[1] - 1)
    total = torch.zeros((), dtype=torch.float64, device=batch.device)
    block_sums = torch.zeros(len(batch), dtype=torch.float64, device=batch.device)
    for start in range(0, len(targets), step):
        rows = slice(start, start + step)
        # per position, then summed in float64: the same numbers give the total and each block's sum
        losses = torch.nn.functional.cross_entropy(logits_of(rows).float(), targets[rows], reduction="none").double()
        total = total + losses.sum()
        block_sums.index_add_(0, block_of_position[rows], losses.detach())
    return total, block_sums, classes


@torch.inference_mode()
def cross_entropy(model: torch.nn.Module, blocks: np.ndarray, batch_size: int,
                  chunk_bytes: int = LOGITS_CHUNK_BYTES) -> LossResult:
    """Mean next-token cross-entropy over every position of every block (each block is inputs + 1 target), and
    each block's own mean.

    Summed in float64 over all tokens, then divided once, so the result does not depend on batch size. The logits
    are made a chunk of positions at a time (next_token_loss_sum) where head_split_agrees on the first block.
    """
    device = next(model.parameters()).device
    total, count, classes, block_sums = 0.0, 0, None, []
    split_head = head_split_agrees(model, torch.from_numpy(blocks[:1, :8].astype(np.int64)).to(device))
    progress = Progress(log, "validation loss", len(blocks) * (blocks.shape[1] - 1), "tokens")
    for start in range(0, len(blocks), batch_size):
        batch = torch.from_numpy(blocks[start : start + batch_size].astype(np.int64)).to(device)
        losses, per_block, classes = next_token_loss_sum(model, batch, split_head, chunk_bytes)
        total += losses.item()
        block_sums.extend(per_block.tolist())
        count += batch[:, 1:].numel()
        progress.advance(batch[:, 1:].numel())
    loss = total / count
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"validation loss is {loss}")
    scored_per_block = blocks.shape[1] - 1
    return LossResult(loss=loss, tokens=count, classes=classes,
                      block_losses=tuple(block_sum / scored_per_block for block_sum in block_sums))


def checkpoint_bos_id(folder: str | Path) -> int | None:
    """The `<bos>` id the checkpoint's own tokenizer puts first (qtraj.tokenization.leading_bos_id), None when it
    puts none: the same answer for the fp, quantized and sharpness jobs of a checkpoint, so all score the same
    blocks."""
    from transformers import AutoTokenizer

    from qtraj.checkpoints import trusts_remote_code
    from qtraj.tokenization import leading_bos_id

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trusts_remote_code(folder))
    except Exception as error:  # missing or unreadable tokenizer files: the folder cannot be evaluated as its model
        raise LoadError(f"the model folder {folder} has no usable tokenizer ({type(error).__name__}: {error}), so "
                        "whether its validation blocks start with <bos> cannot be decided. "
                        f"{how_to_replace(folder)}") from error
    return leading_bos_id(tokenizer)
