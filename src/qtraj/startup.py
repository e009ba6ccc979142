"""What a job process sets before the libraries load: fewer imports at start-up, and no known noise on the console.

Every workflow job is a fresh Python process (a `scripts/*.py` adapter inside `qtraj.joblog.job_logging`), so
start-up is paid once per job and dominates the small default workflow. `job_logging` calls these functions
before any step imports transformers; none of them imports a library itself (bench/startup.py measures them).
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType

# transformers decides once per process which optional packages exist, in `transformers.utils.import_utils`
# (`is_<name>_available`, cached functions that everything in transformers imports by name), and imports some
# of them eagerly just because they are installed. These three cost ~2 of the ~7 CPU-s a job spends starting
# (loading a Llama), and qtraj never uses them through transformers:
# - sklearn (~1.1 CPU-s with the scipy and pandas it pulls in): `transformers.generation.candidate_generator` does
#   `from sklearn.metrics import roc_curve` at import, for assisted generation's (speculative decoding's)
#   adaptive draft length, and `transformers.data.metrics` for the legacy GLUE metrics. qtraj never generates
#   with an assistant model (it scores log-likelihoods; lm-eval's tasks here are log-likelihood ones) and never
#   calls those metrics. lm-eval's own metrics import sklearn themselves when a task needs it, unaffected.
# - torchao (~0.5 CPU-s, and its start-up warnings): `transformers.quantizers.quantizer_torchao` imports it for
#   loading checkpoints saved with transformers' TorchAoConfig, which qtraj never writes or reads. GPTQModel,
#   which requires torchao, imports it itself (`gptqmodel.quantization.dtype`) and never asks transformers
#   whether it is there, so a GPTQModel job works the same; `keep_torchao=True` is for a job that loads a
#   torchao-quantized checkpoint through transformers.
# - scipy (~0.5 CPU-s more once sklearn is skipped): `transformers.loss.loss_for_object_detection` imports
#   `scipy.optimize` at import, for the Hungarian matching of DETR-style object-detection losses; the rest of
#   transformers' scipy use is in vision and audio models. qtraj loads causal language models only.
UNUSED_BY_QTRAJ = ("sklearn", "torchao", "scipy")
# Defaults every job runs with (a value in the environment wins): no hub progress bars (huggingface_hub reads this
# at import), no tokenizers thread pool that a fork would warn about.
JOB_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
TRANSFORMERS_FLAGS = "transformers.utils.import_utils"

# Known noise, by the logger that emits it and the start of its message (re.match): what a job prints at start-up
# or on every run although nothing is wrong. Anything else a library logs still shows.
KNOWN_NOISE = {
    # torchao (imported by GPTQModel jobs) registers its enums the old way: two lines per job on the console
    "torch.utils._pytree": (r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile",),
    # llm-compressor's sequential pipeline traces each layer with torch.fx: one line per GPTQ/AWQ job
    "torch.fx._symbolic_trace": (r"is_fx_tracing will return true for both fx\.symbolic_trace and torch\.export",),
    # torchao's CUDA-only kernels on a machine without them (qtraj runs none of torchao's kernels)
    "torchao": (r"Failed to load .*\.so: Could not load this library",),
    "torchao.kernel.intmm": (r"Warning: Detected no triton",),
    # qtraj hands lm-eval an already loaded model on purpose (the fp or quantized one it just measured)
    "lm_eval.models.huggingface": (r"`pretrained` model kwarg is not of type `str`",
                                   r"Passed an already-initialized model through `pretrained`"),
}


def skip_unused_imports(keep_torchao: bool = False) -> None:
    """Make transformers treat the packages of UNUSED_BY_QTRAJ (torchao only unless `keep_torchao`) as not
    installed, so it does not import them; see there why that is safe. Call before transformers is imported:
    called later, the modules already loaded keep what they imported (later ones still skip them)."""
    names = tuple(name for name in UNUSED_BY_QTRAJ if not (keep_torchao and name == "torchao"))
    flags = sys.modules.get(TRANSFORMERS_FLAGS)
    if flags is not None:
        report_unavailable(flags, names)
        return
    patch_after_import(TRANSFORMERS_FLAGS, lambda module: report_unavailable(module, names))


def report_unavailable(flags: ModuleType, names: tuple[str, ...]) -> None:
    """Point transformers' `is_<name>_available` at an answer of False, in the module that defines it (so every
    later `from transformers.utils import ...` gets it) and in the backend table `requires_backends` reads (so
    code that needs the package fails with transformers' own "requires <name>" error)."""
    package = sys.modules.get("transformers.utils")
    for name in names:
        function = f"is_{name}_available"
        if not hasattr(flags, function):
            continue  # another transformers version: leave it as it is
        unavailable = _not_installed(function)
        setattr(flags, function, unavailable)
        if package is not None and hasattr(package, function):
            setattr(package, function, unavailable)
        backends = getattr(flags, "BACKENDS_MAPPING", {})
        if name in backends:
            backends[name] = (unavailable, backends[name][1])


def _not_installed(function: str) -> Callable[..., bool]:
    def not_installed(*args, **kwargs) -> bool:
        return False

    not_installed.__name__ = not_installed.__qualname__ = function
    not_installed.__doc__ = "qtraj.startup: reported as not installed, so transformers does not import it"
    # like transformers' own flags: a constant for torch.compile rather than a call to trace
    not_installed._dynamo_marked_constant = True
    return not_installed


def patch_after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch(module)` once module `name` has executed, the next time it is imported (once per name: a patch
    already waiting for `name` stays, and this one is dropped)."""
    if not any(isinstance(finder, _PatchAfterImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(name, patch))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` once `name` has executed, before any other module can import names from it; then
    leaves the import system as it was."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one module, once; the finders below then find it as they would have
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    self._patch_after_execution(spec.loader)
                return spec
        return None

    def _patch_after_execution(self, loader: importlib.abc.Loader) -> None:
        execute = loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            del loader.exec_module  # the loader's own method again
            execute(module)
            self.patch(module)

        loader.exec_module = exec_then_patch


class _DropKnownNoise(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


def silence_known_noise(noise: dict[str, tuple[str, ...]] = KNOWN_NOISE) -> None:
    """Drop exactly the known-noise messages (KNOWN_NOISE) where they are logged; every other message of the same
    loggers, and everything else, still reaches the console or the job's log. Idempotent."""
    for name, patterns in noise.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropKnownNoise) for existing in logger.filters):
            logger.addFilter(_DropKnownNoise(patterns))


def quiet_progress_bars() -> None:
    """Progress bars off in this process (TQDM_DISABLE=1, unless the environment says otherwise), including those
    whose caller passes `disable=False` itself.

    A job's progress goes to its log as `Progress` lines; a bar on stderr is Snakemake's console, and in a log file
    it is carriage-return noise. tqdm reads its TQDM_* variables once, when it is imported, and a job's
    `from qtraj import steps` imports torch, which imports tqdm, before `job_logging` runs, so the environment
    default alone is not enough; and compressed-tensors ("Applying quantization config") and lm-eval pass
    `disable=` explicitly, which would override it. So tqdm's constructor is wrapped to force `disable=True`
    (idempotent: a worker forked from the job server calls this again)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    tqdm_std = sys.modules.get("tqdm.std")
    if not os.environ["TQDM_DISABLE"]:  # tqdm too reads any non-empty value as True: empty asks for bars
        return
    if tqdm_std is None:
        import tqdm.std as tqdm_std  # imported now, so the wrapper is in place before any library draws a bar
    init = tqdm_std.tqdm.__init__
    if getattr(init, "_qtraj_forced_off", False):
        return

    @functools.wraps(init)
    def init_without_bar(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    init_without_bar._qtraj_forced_off = True
    tqdm_std.tqdm.__init__ = init_without_bar


# Where llm-compressor and compressed-tensors log: loguru, a logger of its own beside Python's logging. The modules
# whose import sets its sinks up: loguru adds one to stderr; llm-compressor's logger module removes every sink and adds
# one to stdout (and a JSON file when LLM_COMPRESSOR_LOG_FILE is set).
LOGURU_CONFIGURED_BY = ("loguru", "llmcompressor.logger")


def route_loguru_to_logging() -> None:
    """Send what the libraries log through loguru (llm-compressor, compressed-tensors) to Python logging, and only
    there: a job's log then has one writer, `job_logging`'s handler, which also filters the levels (a second writer on
    the same file interleaves partial lines), and nothing reaches the console.

    Works whether loguru is imported already (a worker forked from the job server) or later (a job in its own
    process): the sinks are replaced now, and again right after an import that sets its own up
    (LOGURU_CONFIGURED_BY). llm-compressor's `oneshot` adds a DEBUG file sink of its own when LLM_COMPRESSOR_LOG_FILE
    is set, so `job_logging` unsets it."""
    if "loguru" in sys.modules:
        _forward_loguru(sys.modules["loguru"])
    for name in LOGURU_CONFIGURED_BY:
        if name not in sys.modules:
            patch_after_import(name, lambda _module: _forward_loguru(sys.modules["loguru"]))


def _forward_loguru(loguru: ModuleType) -> None:
    loguru.logger.remove()  # every sink: the library's console and file ones
    # level 0: every record goes on; whether it is written is decided by the Python logger it goes to
    loguru.logger.add(_LoguruToLogging(), level=0, format="{message}")


class _LoguruToLogging:
    """A loguru sink that hands each record to the Python logger named after the module that logged it
    (`llmcompressor.modifiers.gptq.base`, ...), with its level, place and exception.

    llm-compressor's `logger.bind(log_once=True)` (a message logged once per process) is honoured as its own sinks
    do; levels loguru has and logging lacks keep their name (METRIC, SUCCESS)."""

    def __init__(self) -> None:
        self.logged_once: set[tuple[int, str]] = set()

    def __call__(self, message) -> None:
        record = message.record
        level = record["level"].no
        logger = logging.getLogger(record["name"] or "loguru")
        if not logger.isEnabledFor(level):
            return
        if record["extra"].get("log_once"):
            if (level, record["message"]) in self.logged_once:
                return
            self.logged_once.add((level, record["message"]))
        exception = record["exception"]
        python_record = logger.makeRecord(
            logger.name, level, record["file"].path, record["line"], record["message"], (),
            (exception.type, exception.value, exception.traceback) if exception else None, record["function"])
        python_record.levelname = record["level"].name
        logger.handle(python_record)
