"""The interface every quantization method implements, the registry that finds them, and qtraj's one decision of
which modules a method quantizes.

Nothing here imports torch or an engine at module level: Snakemake imports the method files to validate a
config while it builds the DAG, and each engine costs seconds of start-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import torch

METHODS: dict[str, type[QuantizationMethod]] = {}


@dataclass(frozen=True)
class QuantSpec:
    """One quantization config entry, e.g. `gptq-w3g32`: a method with its bits, group size and options."""

    name: str
    method: str
    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool = True
    options: dict = field(default_factory=dict)
    engine: str | None = None  # None: the method's default engine

    def as_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "options": dict(self.options), "engine": self.engine}


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The model's output projection, asked of the model (GPT-NeoX calls it `embed_out`, Llama `lm_head`)."""
    head = model.get_output_embeddings()
    if head is None:
        raise RuntimeError(f"{type(model).__name__} does not name its output head (get_output_embeddings() is None), "
                           "so qtraj cannot keep it out of quantization; it needs a causal LM class that does")
    return head


def quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every `nn.Linear` of the model except its output head, by module path.

    Input embeddings are `nn.Embedding`s and never match. A tied head is the same module object however it is
    reached, so it is excluded by identity, never by name.
    """
    import torch

    head = output_head(model)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def check_same_modules(expected: set[str], quantized: set[str], engine: str) -> None:
    """Refuse an engine run that quantized other modules than qtraj decided (a silent difference in what is
    measured between engines or architectures)."""
    if expected != quantized:
        missing, extra = sorted(expected - quantized), sorted(quantized - expected)
        raise RuntimeError(f"{engine} quantized other modules than qtraj asked for: left out {missing[:5]} "
                           f"({len(missing)} in all), also quantized {extra[:5]} ({len(extra)} in all). The engine "
                           "decides by its own rules for this architecture; pin the engine version qtraj was tested "
                           "with (requirements.lock) or use another engine for this model")


def model_with_state(fp_model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `fp_model` (same class, config and buffers) holding `state`, every key of it (strict: a missing
    or extra tensor is refused): how every fake-quant engine hands back its quantized model."""
    model = copy.deepcopy(fp_model)
    model.load_state_dict(state, strict=True)
    return model.eval()


def options_with_defaults(schema: dict, options: dict) -> dict:
    """`options` with the `default:` of every property the schema declares and the options leave out: the schema
    is the one place a method writes its defaults (config validation fills them the same way)."""
    filled = dict(options)
    for name, prop in schema.get("properties", {}).items():
        if name not in filled and "default" in prop:
            filled[name] = copy.deepcopy(prop["default"])
    return filled


class QuantizationMethod:
    """A post-training quantization method, of one of two kinds (`storage`):

    - "fake-quant": `quantize` runs the engine on a copy of the full-precision model in memory and returns a
      plain model of the same class whose quantized layers hold the dequantized weights the engine computed, so
      every weight-only method is scored by the same engine-free code.
    - "load-time": the engine quantizes while loading (bitsandbytes); `load` returns the quantized model from
      the full-precision checkpoint, so its own kernels are scored.

    Either way the quantized model lives only inside the job that evaluates it (`qtraj.quantization
    .quantize_model`); nothing but the results is written, unless the config asks for the engine's packed model.
    Whatever the engine, the modules it quantizes are `quantized_modules(model)` (every linear but the output
    head), which each engine is told or checked against, and which the per-layer errors compare.
    """

    name: ClassVar[str]
    # The libraries that can run it, the default first; the one used is recorded with its version on every
    # row, so the same method through two engines gives separate, comparable rows.
    engines: ClassVar[tuple[str, ...]]
    needs_calibration: ClassVar[bool]
    supported_bits: ClassVar[tuple[int, ...]]
    storage: ClassVar[str] = "fake-quant"  # or "load-time" (see the class docstring)
    options_schema: ClassVar[dict] = {"type": "object", "additionalProperties": False, "properties": {}}
    # whether `group_size` counts weights along a layer's input features (so it must divide them)
    groups_along_inputs: ClassVar[bool] = True
    # engine -> architectures (model classes, as in a family file's `architecture`) it cannot quantize, with why;
    # checked when the config is validated, so no job starts that must fail
    unsupported_architectures: ClassVar[dict[str, dict[str, str]]] = {}

    @property
    def quantizes_at_load(self) -> bool:
        """Whether the engine quantizes while loading the checkpoint (`load`) instead of in `quantize`."""
        return self.storage == "load-time"

    def engine_version(self, engine: str) -> str:
        from importlib.metadata import version

        return version(engine)

    def engine_of(self, spec: QuantSpec) -> str:
        return spec.engine or self.engines[0]

    def options(self, spec: QuantSpec) -> dict:
        """The spec's options with the method's defaults (from `options_schema`) filled in."""
        return options_with_defaults(self.options_schema, spec.options)

    def check(self, spec: QuantSpec) -> None:
        """Refuse settings the method cannot honour (raise ValueError naming the fix); called at config time."""
        if spec.bits not in self.supported_bits:
            raise ValueError(f"method {spec.method!r} supports bits {list(self.supported_bits)}, not {spec.bits}")
        if self.engine_of(spec) not in self.engines:
            raise ValueError(f"method {spec.method!r} runs on engines {', '.join(self.engines)}, "
                             f"not {spec.engine!r}")

    def check_architecture(self, spec: QuantSpec, architecture: str) -> None:
        """Refuse an architecture the spec's engine cannot quantize (ValueError naming an alternative)."""
        engine = self.engine_of(spec)
        why = self.unsupported_architectures.get(engine, {}).get(architecture)
        if why is not None:
            others = [other for other in self.engines
                      if other != engine and architecture not in self.unsupported_architectures.get(other, {})]
            fix = (f"use engine: {others[0]}" if others else
                   "evaluate that trajectory and this quantization in separate configs")
            raise ValueError(f"{self.name} through {engine} cannot quantize {architecture} ({why}); {fix}")

    def quantized_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The modules this method quantizes in `model` (every linear but the output head)."""
        return quantized_modules(model)

    def dequantized_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The weight a quantized module effectively multiplies by, as a float tensor. Fake-quant models hold it
        as their plain weight; a load-time method whose layers pack their weights overrides this."""
        return module.weight.detach().float()

    def quantize(self, fp_model: torch.nn.Module, checkpoint_dir: Path, spec: QuantSpec,
                 calibration_blocks: np.ndarray | None, packed_dir: Path | None = None) -> torch.nn.Module:
        """Fake-quant methods: the quantized model, in memory, from `fp_model` (loaded from `checkpoint_dir`, left
        untouched): the same class with the quantized modules' weights replaced by their dequantized values and
        every other tensor as in the checkpoint. With `packed_dir`, the engine's own packed model is saved there."""
        raise NotImplementedError(f"method {self.name!r} quantizes at load time; it has no quantize step")

    def load(self, checkpoint_dir: Path, spec: QuantSpec, device):
        """Load-time methods: the quantized model, loaded from the full-precision `checkpoint_dir`."""
        raise NotImplementedError(f"method {self.name!r} quantizes a model in memory; call `quantize`")


STORAGE_STEP = {"fake-quant": "quantize", "load-time": "load"}


def register(cls: type[QuantizationMethod]) -> type[QuantizationMethod]:
    if cls.storage not in STORAGE_STEP:
        raise TypeError(f"method {cls.name!r}: storage must be one of {sorted(STORAGE_STEP)}, not {cls.storage!r}")
    step = STORAGE_STEP[cls.storage]
    if getattr(cls, step) is getattr(QuantizationMethod, step):
        raise TypeError(f"method {cls.name!r} has {cls.storage} storage, so it must implement `{step}`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two quantization methods are both named {cls.name!r}")
    METHODS[cls.name] = cls
    return cls
