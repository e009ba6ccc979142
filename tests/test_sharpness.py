"""The Hessian's top eigenvalue by Lanczos equals the exact one on a model small enough to form H, scipy's ARPACK on
a larger one, and the largest algebraic eigenvalue where a negative one dominates or the top two are close."""

import copy

import numpy as np
import pytest
import torch

from qtraj.sharpness import _loss, largest_eigenvalue, top_hessian_eigenvalue


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Hessians and Hessian-vector products of models this small are thousands of tiny kernels: a second thread only
    adds hand-offs (on a busy 2-core machine the exact Hessian took 92 s with two threads, 4 s with one; the ARPACK
    comparison 26-42 s, 4 s). One thread also fixes the order of every float sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"vocab_size": 12, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 16,
                            **sizes})
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


def test_lanczos_finds_the_exact_top_eigenvalue():
    model = tiny_llama()
    blocks = np.random.default_rng(0).integers(0, 12, size=(4, 9))
    # the reference in float64: in float32 its own rounding moves its top eigenvalue by ~1e-6 relative with the
    # order of its sums (thread count), as much as the bound below allows the estimate
    eigenvalues = exact_hessian_eigenvalues(copy.deepcopy(model).double(), blocks)
    expected = eigenvalues.max().item()  # the largest algebraic eigenvalue: the paper's sharpness
    result = top_hessian_eigenvalue(model, blocks, batch_size=2, iterations=500, tolerance=1e-7, seed=0)
    assert result.converged and result.tokens == 4 * 8
    assert result.top_eigenvalue == pytest.approx(expected, rel=1e-3)
    # the residual bounds the error up to the float32 rounding of the products themselves (~1e-6 relative)
    assert abs(result.top_eigenvalue - expected) <= result.residual + 1e-6 * abs(expected)
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


def _operator(eigenvalues: torch.Tensor, seed: int = 0):
    """v ↦ Av for a symmetric A with these eigenvalues in a random basis, and a random unit start vector."""
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(eigenvalues.double()) @ basis.T
    start = torch.randn(size, generator=generator, dtype=torch.float64)
    return (lambda vector: [matrix @ vector[0]]), [start / start.norm()]


def test_the_largest_eigenvalue_not_the_largest_in_magnitude():
    """A dominant negative eigenvalue (a saddle direction) and a close second one (5.0 vs 4.8) above a bulk near 0:
    the power iteration this replaced stopped on a wrong value in such spectra (wsd step 600 of the default: 0.0012
    where ARPACK finds 6.56)."""
    bulk = torch.rand(1997, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5
    product, start = _operator(torch.cat([torch.tensor([-8.0, 5.0, 4.8], dtype=torch.float64), bulk]))
    found = largest_eigenvalue(product, start, iterations=200, tolerance=1e-3)
    assert found.converged and found.iterations < 50
    assert found.eigenvalue == pytest.approx(5.0, abs=1e-3)
    assert abs(found.eigenvalue - 5.0) <= found.residual <= 1e-3 * 5.0


def test_an_invariant_start_space_ends_with_the_exact_eigenvalue():
    """A start vector in a two-dimensional eigenspace: the second step's remainder vanishes, T₂ holds both exactly."""
    eigenvalues = torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    found = largest_eigenvalue(lambda vector: [eigenvalues * vector[0]],
                               [torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64)], 10, 1e-12)
    assert found.converged and found.iterations == 2 and found.eigenvalue == pytest.approx(3.0, abs=1e-12)


def test_agrees_with_scipy_arpack_on_a_model_too_large_for_the_exact_hessian():
    from scipy.sparse.linalg import LinearOperator, eigsh

    from qtraj.sharpness import hessian_vector_product

    # 6k parameters: 8x the exact-Hessian model above (a Hessian of 6k² entries), still seconds for ARPACK
    model = tiny_llama(seed=1, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=32).double()
    blocks = np.random.default_rng(2).integers(0, 32, size=(4, 17))
    result = top_hessian_eigenvalue(model, blocks, batch_size=2, iterations=100, tolerance=1e-6, seed=0)

    params = [p for p in model.parameters() if p.requires_grad]
    batches = [torch.from_numpy(blocks[i : i + 2].astype(np.int64)) for i in (0, 2)]
    sizes = [p.numel() for p in params]

    def matvec(flat):
        parts = torch.split(torch.from_numpy(np.asarray(flat, dtype=np.float64).ravel()), sizes)
        vector = [part.reshape(p.shape) for part, p in zip(parts, params, strict=True)]
        return torch.cat([h.reshape(-1) for h in hessian_vector_product(model, batches, params, vector)]).numpy()

    with torch.enable_grad():
        operator = LinearOperator((sum(sizes), sum(sizes)), matvec=matvec, dtype=np.float64)
        (expected,) = eigsh(operator, k=1, which="LA", tol=1e-10, return_eigenvectors=False)
    assert sum(sizes) > 6_000 and result.converged
    assert result.top_eigenvalue == pytest.approx(expected, rel=1e-6)
