"""The interface every quantization method implements, and the registry that finds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

METHODS: dict[str, type[QuantizationMethod]] = {}

QUANTIZATION_FILE = "qtraj_quantization.json"


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


class QuantizationMethod:
    """A post-training quantization method, of one of two kinds (`storage`):

    - "fake-quant": `quantize` reads a Hugging Face checkpoint folder and writes a model folder of dequantized
      weights that `qtraj.evaluation.load_causal_lm` loads, so evaluation needs no engine and every weight-only
      method is scored by the same code (a `quantize` job per model, its folder `temp()`).
    - "load-time": the engine quantizes while loading (bitsandbytes); `load` returns the quantized model from
      the full-precision checkpoint inside the evaluation job, so its own kernels are scored and no quantized
      copy is ever written.
    """

    name: ClassVar[str]
    # The libraries that can run it, the default first; the one used is recorded with its version on every
    # row, so the same method through two engines gives separate, comparable rows.
    engines: ClassVar[tuple[str, ...]]
    needs_calibration: ClassVar[bool]
    supported_bits: ClassVar[tuple[int, ...]]
    storage: ClassVar[str] = "fake-quant"  # or "load-time" (see the class docstring)
    options_schema: ClassVar[dict] = {"type": "object", "additionalProperties": False, "properties": {}}

    @property
    def stores_model(self) -> bool:
        """Whether the method writes a quantized model folder (a `quantize` job) or quantizes at load time."""
        return self.storage == "fake-quant"

    def engine_version(self, engine: str) -> str:
        from importlib.metadata import version

        return version(engine)

    def engine_of(self, spec: QuantSpec) -> str:
        return spec.engine or self.engines[0]

    def check(self, spec: QuantSpec) -> None:
        """Refuse settings the method cannot honour (raise ValueError naming the fix); called at config time."""
        if spec.bits not in self.supported_bits:
            raise ValueError(f"method {spec.method!r} supports bits {list(self.supported_bits)}, not {spec.bits}")
        if self.engine_of(spec) not in self.engines:
            raise ValueError(f"method {spec.method!r} runs on engines {', '.join(self.engines)}, "
                             f"not {spec.engine!r}")

    def quantize(self, checkpoint_dir: Path, out_dir: Path, spec: QuantSpec,
                 calibration_blocks: np.ndarray | None) -> None:
        """Fake-quant methods: write the quantized model folder `out_dir`."""
        raise NotImplementedError(f"method {self.name!r} quantizes at load time; it has no quantize step")

    def load(self, checkpoint_dir: Path, spec: QuantSpec, device):
        """Load-time methods: the quantized model, loaded from the full-precision `checkpoint_dir`."""
        raise NotImplementedError(f"method {self.name!r} stores its quantized models; load them from its folder")


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
