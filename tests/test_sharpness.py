"""The Hessian's top eigenvalue by power iteration equals the exact one on a model small enough to form H."""

import numpy as np
import pytest
import torch

from qtraj.sharpness import _loss, largest_eigenvalue, top_hessian_eigenvalue


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    config._attn_implementation = "eager"  # the exact Hessian below needs double backward through attention
    return LlamaForCausalLM(config).float()


def exact_hessian_eigenvalues(model, blocks):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batches = [torch.from_numpy(blocks.astype(np.int64))]

    def loss_of(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        return _functional_loss(model, params, batches)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    return torch.linalg.eigvalsh((hessian + hessian.T) / 2)


def _functional_loss(model, params, batches):
    total, count = 0.0, 0
    for batch in batches:
        logits = torch.func.functional_call(model, params, (), {"input_ids": batch[:, :-1]}).logits
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        count += batch[:, 1:].numel()
    return total / count


def test_power_iteration_finds_the_exact_top_eigenvalue():
    model = tiny_llama()
    blocks = np.random.default_rng(0).integers(0, 12, size=(4, 9))
    eigenvalues = exact_hessian_eigenvalues(model, blocks)
    expected = eigenvalues.max().item()  # the largest algebraic eigenvalue: the paper's sharpness
    result = top_hessian_eigenvalue(model, blocks, batch_size=2, iterations=500, tolerance=1e-7, seed=0)
    assert result.converged and result.tokens == 4 * 8
    assert result.top_eigenvalue == pytest.approx(expected, rel=1e-3)
    with torch.no_grad():  # the loss the estimate refers to is the plain mean over the blocks
        assert _loss(model, [torch.from_numpy(blocks.astype(np.int64))]).item() > 0


def test_the_estimate_is_seeded_and_does_not_touch_the_weights():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    blocks = np.random.default_rng(1).integers(0, 12, size=(4, 9))
    first = top_hessian_eigenvalue(model, blocks, 2, 30, 1e-4, seed=3)
    second = top_hessian_eigenvalue(model, blocks, 2, 30, 1e-4, seed=3)
    assert first == second
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_a_dominant_negative_eigenvalue_is_shifted_away():
    """Power iteration alone converges to -5 here (largest magnitude); sharpness is the largest eigenvalue, 2."""
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    matrix = rotation @ torch.diag(torch.tensor([-5.0, 2.0, 1.0, -0.5], dtype=torch.float64)) @ rotation.T
    start = [torch.ones(4, dtype=torch.float64) / 2]
    top, first, second = largest_eigenvalue(lambda vector: [matrix @ vector[0]], start, 2000, 1e-12)
    assert first.eigenvalue == pytest.approx(-5.0, rel=1e-6) and second is not None
    assert top == pytest.approx(2.0, rel=1e-6)
    positive = rotation @ torch.diag(torch.tensor([5.0, 2.0, -1.0, 0.5], dtype=torch.float64)) @ rotation.T
    top, first, second = largest_eigenvalue(lambda vector: [positive @ vector[0]], start, 2000, 1e-12)
    assert top == pytest.approx(5.0, rel=1e-6) and second is None
