"""Sharpness of the loss at a checkpoint: the Hessian's top eigenvalue, by power iteration on Hessian-vector
products.

Written here because none of the field's maintained libraries does it for a Hugging Face causal LM (PyHessian is
unmaintained and targets vision models); torch.autograd supplies the Hessian-vector product (double backward), so
the Hessian itself is never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SharpnessResult:
    top_eigenvalue: float  # the Hessian eigenvalue of largest magnitude (power iteration's limit)
    iterations: int
    converged: bool  # relative change of the estimate fell below the tolerance
    tokens: int  # scored predictions in the fixed batches the loss is averaged over


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


def top_hessian_eigenvalue(model: torch.nn.Module, blocks: np.ndarray, batch_size: int, iterations: int,
                           tolerance: float, seed: int) -> SharpnessResult:
    """Power iteration v ← Hv / ‖Hv‖ from a seeded random start, on the loss over `blocks` (each block is inputs
    + 1 target). Stops when the Rayleigh quotient vᵀHv changes by less than `tolerance` (relative)."""
    model.eval()
    # Fused attention kernels (SDPA, flash) have no second derivative: Hessian-vector products need eager attention.
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.from_numpy(blocks[start : start + batch_size].astype(np.int64)).to(device)
               for start in range(0, len(blocks), batch_size)]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(device=device, dtype=p.dtype) for p in params]
    norm = math.sqrt(sum((v * v).sum().item() for v in vector))
    vector = [v / norm for v in vector]
    estimate, converged, done = 0.0, False, 0
    for done in range(1, iterations + 1):
        product = hessian_vector_product(model, batches, params, vector)
        new_estimate = sum((h * v).sum().item() for h, v in zip(product, vector, strict=True))
        norm = math.sqrt(sum((h * h).sum().item() for h in product))
        if not math.isfinite(new_estimate) or norm == 0:
            raise FloatingPointError(f"the Hessian-vector product is not finite (estimate {new_estimate})")
        vector = [h / norm for h in product]
        if done > 1 and abs(new_estimate - estimate) <= tolerance * abs(new_estimate):
            estimate, converged = new_estimate, True
            break
        estimate = new_estimate
    model.zero_grad(set_to_none=True)
    tokens = sum(batch[:, 1:].numel() for batch in batches)
    return SharpnessResult(top_eigenvalue=estimate, iterations=done, converged=converged, tokens=tokens)
