"""Sharpness of the loss at a checkpoint: the Hessian's largest eigenvalue, by power iteration on Hessian-vector
products.

Power iteration converges to the eigenvalue of largest *magnitude*; near initialisation, or for a checkpoint that is
not at a minimum, that can be a negative one (a saddle direction). The paper's sharpness is the largest algebraic
eigenvalue, so when the first iteration ends on a negative μ, a second runs on H − μI (every eigenvalue shifted to
≥ 0, the largest one now the largest in magnitude) and μ is added back.

Written here because none of the field's maintained libraries does it for a Hugging Face causal LM (PyHessian is
unmaintained and targets vision models); torch.autograd supplies the Hessian-vector product (double backward), so
the Hessian itself is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SharpnessResult:
    top_eigenvalue: float  # the Hessian's largest (algebraic) eigenvalue: the paper's sharpness
    iterations: int  # Hessian-vector products, both iterations together
    converged: bool  # relative change of the estimate fell below the tolerance (in each iteration run)
    tokens: int  # scored predictions in the fixed batches the loss is averaged over
    largest_magnitude: float  # the first power iteration's limit: equal to top_eigenvalue unless it is negative


@dataclass(frozen=True)
class PowerIteration:
    eigenvalue: float
    iterations: int
    converged: bool


Vector = list[torch.Tensor]


def _loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the fixed batches."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch[:, :-1]).logits.float()
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        count += batch[:, 1:].numel()
    return total / count


def hessian_vector_product(model: torch.nn.Module, batches: list[torch.Tensor], params: list[torch.Tensor],
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    loss = _loss(model, batches)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((grad * v).sum() for grad, v in zip(grads, vector, strict=True))
    return list(torch.autograd.grad(dot, params))


def power_iteration(product: Callable[[Vector], Vector], start: Vector, iterations: int,
                    tolerance: float) -> PowerIteration:
    """The eigenvalue of largest magnitude of the symmetric operator `product` (v ↦ Av): v ← Av / ‖Av‖ from `start`
    (unit norm), until the Rayleigh quotient vᵀAv changes by less than `tolerance` (relative)."""
    vector, estimate, converged, done = start, 0.0, False, 0
    for done in range(1, iterations + 1):
        image = product(vector)
        new_estimate = sum((a * v).sum().item() for a, v in zip(image, vector, strict=True))
        norm = math.sqrt(sum((a * a).sum().item() for a in image))
        if not math.isfinite(new_estimate) or norm == 0:
            raise FloatingPointError(f"the Hessian-vector product is not finite (estimate {new_estimate})")
        vector = [a / norm for a in image]
        if done > 1 and abs(new_estimate - estimate) <= tolerance * abs(new_estimate):
            estimate, converged = new_estimate, True
            break
        estimate = new_estimate
    return PowerIteration(estimate, done, converged)


def largest_eigenvalue(product: Callable[[Vector], Vector], start: Vector, iterations: int,
                       tolerance: float) -> tuple[float, PowerIteration, PowerIteration | None]:
    """The largest (algebraic) eigenvalue of the symmetric operator `product`, the plain power iteration and, when
    that ended on a negative eigenvalue μ, the one on A − μI (whose eigenvalues λ − μ are all ≥ 0)."""
    first = power_iteration(product, start, iterations, tolerance)
    if first.eigenvalue >= 0:
        return first.eigenvalue, first, None
    shift = first.eigenvalue

    def shifted(vector: Vector) -> Vector:
        return [a - shift * v for a, v in zip(product(vector), vector, strict=True)]

    second = power_iteration(shifted, start, iterations, tolerance)
    return second.eigenvalue + shift, first, second


def top_hessian_eigenvalue(model: torch.nn.Module, blocks: np.ndarray, batch_size: int, iterations: int,
                           tolerance: float, seed: int) -> SharpnessResult:
    """The largest eigenvalue of the Hessian of the loss over `blocks` (each block is inputs + 1 target), by power
    iteration from a seeded random start (`largest_eigenvalue`)."""
    model.eval()
    # Fused attention kernels (SDPA, flash) have no second derivative: Hessian-vector products need eager attention.
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.from_numpy(blocks[start : start + batch_size].astype(np.int64)).to(device)
               for start in range(0, len(blocks), batch_size)]
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=generator).to(device=device, dtype=p.dtype) for p in params]
    norm = math.sqrt(sum((v * v).sum().item() for v in start))
    start = [v / norm for v in start]
    top, first, second = largest_eigenvalue(lambda vector: hessian_vector_product(model, batches, params, vector),
                                            start, iterations, tolerance)
    model.zero_grad(set_to_none=True)
    tokens = sum(batch[:, 1:].numel() for batch in batches)
    return SharpnessResult(top_eigenvalue=top, iterations=first.iterations + (second.iterations if second else 0),
                           converged=first.converged and (second is None or second.converged), tokens=tokens,
                           largest_magnitude=first.eigenvalue)
