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


@dataclass(frozen=True)
class WeightMatrix:
    """One weight matrix qtraj quantizes, read and written as [out_features, in_features] whatever its storage.

    `name` is what its result rows and the engines call it: the module path for an `nn.Linear` or a transformers
    `Conv1D` (GPT-2), `<experts>.<e>.gate_proj | up_proj | down_proj` for expert e of a fused-experts module (the
    names llm-compressor and GPTQModel give the per-expert linears they split such a module into). `key` is the
    state-dict entry holding it: an nn.Linear stores [out, in], a Conv1D [in, out], fused experts one 3-D tensor
    for all experts (`gate_up_proj` [E, 2·ffn, hidden] with the gate rows first, `down_proj` [E, hidden, ffn])."""

    name: str
    key: str
    layout: str  # "linear", "conv1d" or "expert"
    expert: int | None = None
    rows: tuple[int, int] | None = None  # the expert's rows of `key` (gate or up half of gate_up_proj)

    def read(self, state: dict) -> torch.Tensor:
        tensor = state[self.key]
        if self.layout == "conv1d":
            return tensor.T
        if self.layout == "expert":
            tensor = tensor[self.expert]
            return tensor if self.rows is None else tensor[self.rows[0] : self.rows[1]]
        return tensor

    def write(self, state: dict, weight: torch.Tensor) -> None:
        """Put `weight` ([out, in]) into `state`. An expert's slice is written in place (copying the 3-D tensor
        per expert would cost its size each time): `state` must own its fused-expert tensors (see `owned_state`)."""
        current = state[self.key]
        if self.layout == "linear":
            state[self.key] = weight.to(current.dtype).contiguous()
        elif self.layout == "conv1d":
            state[self.key] = weight.T.to(current.dtype).contiguous()
        else:
            target = current[self.expert] if self.rows is None else current[self.expert][self.rows[0] : self.rows[1]]
            target.copy_(weight.to(current.dtype))

    def in_features(self, state: dict) -> int:
        return self.read(state).shape[1]


def owned_state(state: dict[str, torch.Tensor], matrices: dict[str, WeightMatrix]) -> dict[str, torch.Tensor]:
    """A model's `state` on the host, with private copies of the tensors that `WeightMatrix.write` changes in place
    (fused experts), so writing never alters the model it came from."""
    in_place = {matrix.key for matrix in matrices.values() if matrix.layout == "expert"}
    return {key: (value.detach().cpu().clone() if key in in_place else value.detach().cpu())
            for key, value in state.items()}


def read_matrix(model: torch.nn.Module, matrix: WeightMatrix) -> torch.Tensor:
    """One matrix of `model` as [out, in], read from its own parameter (no state dict built per matrix)."""
    return matrix.read({matrix.key: model.get_parameter(matrix.key)})


# Mixture-of-experts classes of transformers 5 with fused experts: engines that qtraj has not checked on them
# refuse these at config time (`unsupported_architectures`), and any other fused-experts model when it is loaded.
FUSED_EXPERT_ARCHITECTURES = ("OlmoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM")


class UnsupportedArchitecture(ValueError):
    """A model holds weight matrices qtraj cannot say how to quantize."""


def fused_experts(module: torch.nn.Module) -> bool:
    """transformers 5 MoE experts: one 3-D parameter for all experts' gate and up projections and one for their
    down projections (OLMoE, Qwen3-MoE, Mixtral, ...), declared by its experts decorator's `is_transposed`."""
    import torch

    return (getattr(module, "is_transposed", None) is not None
            and isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter)
            and isinstance(getattr(module, "down_proj", None), torch.nn.Parameter)
            and module.gate_up_proj.ndim == 3)


def _is_router(module: torch.nn.Module) -> bool:
    """An MoE router (its weight scores experts per token): kept in full precision, as both engines keep it."""
    return type(module).__name__.endswith("Router") and getattr(module, "weight", None) is not None


def quantized_matrices(model: torch.nn.Module) -> dict[str, WeightMatrix]:
    """qtraj's one decision of what is quantized, by module type, never by name: every weight matrix of the
    decoder — `nn.Linear`, transformers' `Conv1D`, each expert's matrices of a fused-experts module — except the
    output head (excluded by identity: a tied head is the same module however it is reached) and the input
    embeddings (`nn.Embedding`, never a match). Norms, biases and routers stay in full precision. A weight of two or
    more dimensions that is none of these refuses the architecture, naming it, so nothing goes unmeasured silently.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    head = output_head(model)
    matrices: dict[str, WeightMatrix] = {}
    kept = set()  # state keys deliberately left in full precision
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if module is head or isinstance(module, torch.nn.Embedding) or _is_router(module):
            kept.update(f"{prefix}{key}" for key, _ in module.named_parameters(recurse=False))
        elif isinstance(module, torch.nn.Linear):
            matrices[name] = WeightMatrix(name, f"{prefix}weight", "linear")
        elif isinstance(module, Conv1D):
            matrices[name] = WeightMatrix(name, f"{prefix}weight", "conv1d")
        elif fused_experts(module):
            if module.is_transposed or not getattr(module, "is_concatenated", True):
                raise UnsupportedArchitecture(
                    f"{type(model).__name__}: the experts of {name} are stored transposed or not concatenated; qtraj "
                    "reads fused experts as gate_up_proj [E, 2·ffn, hidden] and down_proj [E, hidden, ffn] only")
            ffn = module.gate_up_proj.shape[1] // 2
            for expert in range(module.gate_up_proj.shape[0]):
                for projection, key, rows in (("gate_proj", "gate_up_proj", (0, ffn)),
                                              ("up_proj", "gate_up_proj", (ffn, 2 * ffn)),
                                              ("down_proj", "down_proj", None)):
                    matrix = WeightMatrix(f"{prefix}{expert}.{projection}", f"{prefix}{key}", "expert", expert, rows)
                    matrices[matrix.name] = matrix
    covered = {matrix.key for matrix in matrices.values()} | kept
    head_keys = {f"{name}.weight" for name, module in model.named_modules() if module is head}
    unknown = [key for key, tensor in model.named_parameters(remove_duplicate=False)
               if tensor.ndim >= 2 and key not in covered and key not in head_keys]
    if unknown:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} holds weight matrices that are no nn.Linear, Conv1D or fused experts: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. qtraj would leave them unquantized and "
            "report a ΔQ L that measures only part of the model; teach qtraj.methods.base.quantized_matrices this "
            "module type first")
    return matrices


def architecture_kinds(matrices: dict[str, WeightMatrix]) -> set[str]:
    """Which storage layouts a model's quantized matrices have ("linear", "conv1d", "expert")."""
    return {matrix.layout for matrix in matrices.values()}


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


# An option's `engine_default:` (beside `type` and `description` in a method's options_schema) is what the engine
# runs with where a quantization entry leaves the option out. Unlike `default:`, config validation does not write it
# into the entry: an entry's options feed its config hash (qtraj.provenance), so such an option, added after results
# exist, reruns none of them; and an option only one engine has stays out of the entries of the others, whose
# `check` refuses it.
ENGINE_DEFAULT = "engine_default"


def options_with_defaults(schema: dict, options: dict, engine: bool = False) -> dict:
    """`options` with the `default:` of every property the schema declares and the options leave out: the schema
    is the one place a method writes its defaults (config validation fills them the same way). `engine`: also with
    each `engine_default:` (ENGINE_DEFAULT), i.e. the options the engine runs with."""
    keys = ("default", ENGINE_DEFAULT) if engine else ("default",)
    filled = dict(options)
    for name, prop in schema.get("properties", {}).items():
        for key in keys:
            if name not in filled and key in prop:
                filled[name] = copy.deepcopy(prop[key])
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
    Whatever the engine, the matrices it quantizes are `quantized_matrices(model)` (every decoder weight matrix
    but the output head), which each engine is told or checked against, and which the per-layer errors compare.
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
        """The options the engine runs with: the spec's, with the method's defaults from `options_schema` filled
        in, `engine_default`s included."""
        return options_with_defaults(self.options_schema, spec.options, engine=True)

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

    def quantized_matrices(self, model: torch.nn.Module) -> dict[str, WeightMatrix]:
        """The weight matrices this method quantizes in `model` (qtraj's one decision: `quantized_matrices`)."""
        return quantized_matrices(model)

    def dequantized_weight(self, model: torch.nn.Module, matrix: WeightMatrix) -> torch.Tensor:
        """The weight [out, in] a quantized model effectively multiplies by, as a float tensor. Fake-quant models
        hold it in their state; a load-time method whose layers pack their weights overrides this."""
        return read_matrix(model, matrix).detach().float()

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
