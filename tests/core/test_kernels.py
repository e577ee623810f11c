"""The sparse kernels against their eager references: values and every gradient, odd shapes, duplicates,
padding, empty batches, non-contiguous inputs; gradcheck in float64; the SAE_KERNELS dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sae_core
from sae_core import kernels
from sae_core.kernels import backends, build

FAST_MODES = ("auto", "torch")  # "auto" is the C++ twin on CPU when a compiler exists
SHAPES = [(7, 3, 11, 5), (1, 1, 4, 3), (5, 6, 6, 4), (33, 8, 40, 17)]  # (B, K, F, D); (5, 6, 6, ..) is k = d_sae


@pytest.fixture(params=FAST_MODES)
def mode(request, monkeypatch):
    monkeypatch.setenv("SAE_KERNELS", request.param)
    return request.param


def decode_inputs(B: int, K: int, F: int, D: int, dtype=torch.float32, seed: int = 0, pad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    idx_BK = torch.randint(0, F, (B, K), generator=gen)
    if B > 1:
        idx_BK[1] = idx_BK[0]  # duplicate rows across the batch
    if K > 1 and B > 0:
        idx_BK[0, 1] = idx_BK[0, 0]  # and a duplicate inside a row
    if pad and K > 1 and B > 2:
        idx_BK[2, K // 2:] = -1
    vals_BK = torch.randn(B, K, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    W_dec_FD = torch.randn(F, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b_dec_D = torch.randn(D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return idx_BK, vals_BK, W_dec_FD, b_dec_D


def value_and_grads(fn, inputs, seed: int = 1):
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device)
    (out.double() * weight).sum().backward()
    grads = [t.grad.clone() if t.grad is not None else None for t in inputs if torch.is_tensor(t) and t.requires_grad]
    for t in inputs:
        if torch.is_tensor(t):
            t.grad = None
    return out.detach(), grads


def assert_all_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.double(), y.double(), **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_decode_matches_reference(mode, shape):
    inputs = decode_inputs(*shape)
    out, grads = value_and_grads(kernels.sparse_decode, inputs)
    ref_out, ref_grads = value_and_grads(kernels.sparse_decode_reference, inputs)
    assert_all_close([out, *grads], [ref_out, *ref_grads], rtol=1e-5, atol=1e-5)


def test_sparse_decode_empty_batch_and_non_contiguous(mode):
    idx_BK, vals_BK, W_dec_FD, b_dec_D = decode_inputs(0, 4, 9, 6)
    out, grads = value_and_grads(kernels.sparse_decode, (idx_BK, vals_BK, W_dec_FD, b_dec_D))
    assert out.shape == (0, 6) and grads[1].abs().sum() == 0 and grads[2].abs().sum() == 0
    gen = torch.Generator().manual_seed(3)
    idx_BK = torch.randint(-1, 9, (10, 8), generator=gen)[:, ::2]  # strided, with padding
    vals_BK = torch.randn(10, 8, generator=gen)[:, 1::2].requires_grad_()
    W_dec_FD = torch.randn(6, 9, generator=gen).t().requires_grad_()  # a transposed view
    inputs = (idx_BK, vals_BK, W_dec_FD, b_dec_D)
    assert not (idx_BK.is_contiguous() or vals_BK.is_contiguous() or W_dec_FD.is_contiguous())
    assert_all_close(value_and_grads(kernels.sparse_decode, inputs)[1],
                     value_and_grads(kernels.sparse_decode_reference, inputs)[1], rtol=1e-5, atol=1e-5)


def test_sparse_decode_bf16(mode):
    inputs = decode_inputs(9, 4, 13, 24, dtype=torch.bfloat16)
    out, grads = value_and_grads(kernels.sparse_decode, inputs)
    exact = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_out, ref_grads = value_and_grads(kernels.sparse_decode_reference, exact)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_all_close([out, *grads], [ref_out, *ref_grads], rtol=3e-2, atol=5e-2)


def encode_inputs(B: int, D: int, F: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    W_enc_DF = torch.randn(D, F, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b_enc_F = (0.5 * torch.randn(F, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    return x_BD, W_enc_DF, b_enc_F


def sorted_by_index(vals_BK, idx_BK):
    idx_sorted_BK, order_BK = idx_BK.sort(dim=1)
    return vals_BK.gather(1, order_BK), idx_sorted_BK


@pytest.mark.parametrize("B,D,F,k", [(9, 5, 12, 3), (4, 3, 7, 1), (6, 4, 10, 10), (0, 4, 6, 2), (50, 17, 300, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_encode_matches_reference(mode, B, D, F, k, dtype):
    inputs = encode_inputs(B, D, F, dtype)
    vals_BK, idx_BK = kernels.topk_encode(*inputs, k)
    ref_vals_BK, ref_idx_BK = kernels.topk_encode_reference(*inputs, k)
    torch.testing.assert_close(sorted_by_index(vals_BK, idx_BK), sorted_by_index(ref_vals_BK, ref_idx_BK))
    if k == F and B > 0:
        assert (vals_BK == 0).any()  # keeping every latent keeps negative ones: relu is exercised

    def through_decode(encode):
        W_dec_FD = torch.randn(F, D, generator=torch.Generator().manual_seed(5), dtype=dtype)
        return lambda x, W, b: kernels.sparse_decode_reference(*encode(x, W, b, k)[::-1], W_dec_FD, W_dec_FD[0])

    grads = value_and_grads(through_decode(kernels.topk_encode), inputs)[1]
    ref_grads = value_and_grads(through_decode(kernels.topk_encode_reference), inputs)[1]
    assert_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [4, 7])
def test_topk_encode_in_row_chunks_matches_reference(mode, monkeypatch, chunk_rows):
    """The CPU path's row blocks (ops.CPU_CHUNK_ROWS; a ragged last block at 7) give the one-product result,
    and topk_encode_sampled's rows are the relu'd product of the first rows."""
    from sae_core.kernels import ops

    monkeypatch.setattr(ops, "CPU_CHUNK_ROWS", chunk_rows)
    inputs = encode_inputs(25, 6, 30, torch.float32)
    vals_BK, idx_BK, sample_RF = kernels.topk_encode_sampled(*inputs, 4, 3)
    ref_vals_BK, ref_idx_BK = kernels.topk_encode_reference(*inputs, 4)
    torch.testing.assert_close(sorted_by_index(vals_BK, idx_BK), sorted_by_index(ref_vals_BK, ref_idx_BK))
    x_BD, W_enc_DF, b_enc_F = inputs
    torch.testing.assert_close(sample_RF, torch.relu(x_BD[:3] @ W_enc_DF + b_enc_F).detach())
    weight_F = torch.randn(30, generator=torch.Generator().manual_seed(8))
    grads = torch.autograd.grad((vals_BK * weight_F[idx_BK]).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_vals_BK * weight_F[ref_idx_BK]).sum(), inputs)
    assert_all_close(grads, ref_grads, rtol=1e-5, atol=1e-5)


def test_topk_encode_input_bias_matches_reference(mode):
    x_BD, W_enc_DF, b_enc_F = encode_inputs(23, 7, 40, torch.float32)
    x_BD.requires_grad_(False)  # as in training: only the input bias (b_dec) carries gradient into x - b
    bias_D = torch.randn(7, generator=torch.Generator().manual_seed(6)).requires_grad_()
    results = []
    for encode in (kernels.topk_encode, kernels.topk_encode_reference):
        vals_BK, idx_BK = encode(x_BD, W_enc_DF, b_enc_F, 5, bias_D)
        weight_F = torch.randn(40, generator=torch.Generator().manual_seed(7))  # by latent: orders differ
        (vals_BK * weight_F[idx_BK]).sum().backward()
        results.append([*sorted_by_index(vals_BK.detach(), idx_BK), W_enc_DF.grad, b_enc_F.grad, bias_D.grad])
        for t in (W_enc_DF, b_enc_F, bias_D):
            t.grad = None
    assert results[0][2].abs().sum() > 0 and results[0][4].abs().sum() > 0
    assert_all_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_gradcheck_float64(mode):
    idx_BK, vals_BK, W_dec_FD, b_dec_D = decode_inputs(5, 3, 6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v, W, b: kernels.sparse_decode(idx_BK, v, W, b), (vals_BK, W_dec_FD, b_dec_D))
    x_BD, W_enc_DF, b_enc_F = encode_inputs(4, 3, 8)
    assert torch.autograd.gradcheck(lambda x, W, b: kernels.topk_encode(x, W, b, 3)[0], (x_BD, W_enc_DF, b_enc_F))


def test_to_padded_round_trip(mode):
    gen = torch.Generator().manual_seed(2)
    latents_BF = torch.randn(6, 10, generator=gen) * (torch.rand(6, 10, generator=gen) < 0.3)
    latents_BF[3] = 0  # a row with no non-zeros
    latents_BF.requires_grad_()
    idx_BK, vals_BK = kernels.to_padded(latents_BF)
    assert idx_BK.shape[1] == max(int((latents_BF != 0).sum(1).max()), 1) and (idx_BK[3] == -1).all()
    W_dec_FD, b_dec_D = torch.randn(10, 7, generator=gen), torch.randn(7, generator=gen)
    x_hat_BD = kernels.sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D)
    torch.testing.assert_close(x_hat_BD, latents_BF @ W_dec_FD + b_dec_D)
    x_hat_BD.sum().backward()
    expected_BF = (W_dec_FD.sum(1).expand(6, 10) * (latents_BF != 0)).detach()  # zero where the latent is zero
    torch.testing.assert_close(latents_BF.grad, expected_BF)
    latents_BF.grad = None
    support_BF = torch.ones(6, 10, dtype=torch.bool)  # every position: the dense decoder's gradient exactly
    idx_BK, vals_BK = kernels.to_padded(latents_BF, support_BF)
    assert idx_BK.shape == (6, 10)
    kernels.sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D).sum().backward()
    torch.testing.assert_close(latents_BF.grad, W_dec_FD.sum(1).expand(6, 10))
    idx_BK, vals_BK = kernels.to_padded(torch.zeros(0, 10))
    assert idx_BK.shape == (0, 1) and vals_BK.shape == (0, 1)


def test_cpu_twin_topk_and_csr_match_torch():
    lib = build.cpu_library()
    if lib is None:
        pytest.skip("no C++ compiler")
    cpu = backends.CpuBackend(lib)
    h_BF = torch.randn(37, 5000)  # long rows take the sampled-threshold path, short ones the heap
    h_BF[1] = 0.0  # ties everywhere
    h_BF[2, ::3] = float("nan")  # NaNs are never selected: compare on a row without them below
    h_BF[2, 1::3] = torch.arange(1667.0)  # ascending: the sample underestimates nothing
    h_BF[3, :] = torch.linspace(1, 0, 5000)  # descending
    torch.testing.assert_close(cpu.topk(h_BF[1:2], 5)[0], torch.zeros(1, 5))
    assert not cpu.topk(h_BF[2:3], 5)[0].isnan().any()
    h_BF = h_BF[3:]  # indices are only comparable without ties
    for k in (1, 7, 64):
        short_BF = h_BF[:, :900].contiguous()
        torch.testing.assert_close(sorted_by_index(*cpu.topk(short_BF, k)),
                                   sorted_by_index(*short_BF.topk(k, sorted=False)))
        torch.testing.assert_close(sorted_by_index(*cpu.topk(h_BF, k)), sorted_by_index(*h_BF.topk(k, sorted=False)))
    bias_F, scratch_BF = torch.randn(5000), h_BF.clone()
    vals_BK, idx_BK = cpu.topk(scratch_BF, 9, bias_F, densify=True)  # bias fused, row densified in place
    expected_BK, expected_idx_BK = (h_BF + bias_F).topk(9, sorted=False)
    torch.testing.assert_close(sorted_by_index(vals_BK, idx_BK), sorted_by_index(expected_BK, expected_idx_BK))
    torch.testing.assert_close(scratch_BF, torch.zeros_like(h_BF).scatter(1, idx_BK, vals_BK.relu()))
    idx_BK = torch.randint(-1, 50, (30, 9))
    src_BD, vals_BK = torch.randn(30, 5), torch.randn(30, 9)
    torch.testing.assert_close(cpu.scatter_rows(idx_BK, vals_BK, src_BD, 50),
                               backends.TorchBackend().scatter_rows(idx_BK, vals_BK, src_BD, 50))
    for n_rows in (50, 37):  # 37: a last block of latents narrower than the C++'s 16
        expected = backends.TorchBackend().scatter_rows(idx_BK.clamp_max(n_rows), vals_BK, src_BD, n_rows).t()
        got = cpu.scatter_cols(idx_BK.clamp_max(n_rows), vals_BK, src_BD, n_rows)
        assert got.shape == (5, n_rows) and got.is_contiguous()
        torch.testing.assert_close(got, expected)


def test_cpu_twin_threads_are_torchs_openmp_pool():
    """The C++ twin's workers are the threads of the OpenMP runtime torch loaded, not a second runtime (or
    std::threads) competing for the cores with torch's workers: one libgomp mapped in the process."""
    maps = Path("/proc/self/maps")
    if build.cpu_library() is None or not maps.exists():
        pytest.skip("no C++ compiler, or no /proc")
    assert build.cpu_library().sae_cpu_uses_openmp() == 1
    runtimes = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes
    cpu, h_BF, before = backends.CpuBackend(build.cpu_library()), torch.randn(64, 3000), torch.get_num_threads()
    try:
        for threads in (1, 2):  # the same result on one worker and on the pool
            torch.set_num_threads(threads)
            torch.testing.assert_close(sorted_by_index(*cpu.topk(h_BF, 16)),
                                       sorted_by_index(*h_BF.topk(16, sorted=False)))
    finally:
        torch.set_num_threads(before)


def test_cpu_twin_without_openmp_runs_on_std_threads(tmp_path, monkeypatch):
    """A compiler without OpenMP builds the same kernels on std::threads (the second build cpu_library tries)."""
    compiler = build.shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("SAE_KERNELS_CACHE", str(tmp_path))
    lib = build.declare_cpu(build._load(compiler, build.KERNEL_DIR / "sparse_cpu.cpp", build.CPU_FLAGS, "no-omp"))
    assert lib.sae_cpu_uses_openmp() == 0
    h_BF = torch.randn(300, 3000)  # 900k entries: split over torch's thread count
    torch.testing.assert_close(sorted_by_index(*backends.CpuBackend(lib).topk(h_BF, 16)),
                               sorted_by_index(*h_BF.topk(16, sorted=False)))


def test_select_above_matches_nonzero_layout():
    """The C++ twin's selection of the entries above a threshold (one number, or one per column) gives the
    torch backend's padded layout: column order, -1 padding to the widest row, NaN never selected."""
    torch.manual_seed(0)
    h_BF = torch.randn(70, 300)
    h_BF[3] = -1.0  # a row with no entry above
    h_BF[5, ::7] = float("nan")
    backends_ = [backends.TorchBackend()] + ([backends.CpuBackend(build.cpu_library())] if build.cpu_library() else [])
    for threshold in (0.0, 1.5, torch.linspace(-0.5, 2.5, 300)):
        expected = (h_BF > threshold).nonzero(as_tuple=True)
        for backend in backends_:
            idx_BK, counts_B = backend.select_above(h_BF, threshold)
            assert idx_BK.shape[1] == max(int(counts_B.max()), 1) and counts_B[3] == 0
            assert torch.equal(counts_B, torch.bincount(expected[0], minlength=70))
            rows_N, slots_N = (idx_BK >= 0).nonzero(as_tuple=True)
            assert torch.equal(rows_N, expected[0]) and torch.equal(idx_BK[rows_N, slots_N], expected[1])
    for backend in backends_:  # no rows
        idx_BK, counts_B = backend.select_above(torch.empty(0, 9), 0.0)
        assert idx_BK.shape == (0, 1) and counts_B.shape == (0,)


def test_dispatch_follows_environment(monkeypatch):
    calls = []
    real = kernels.sparse_decode_reference
    monkeypatch.setattr(kernels, "sparse_decode_reference", lambda *a: calls.append(1) or real(*a))
    inputs = decode_inputs(4, 2, 5, 3)
    monkeypatch.setenv("SAE_KERNELS", "reference")
    kernels.sparse_decode(*inputs)
    assert calls and kernels.backend_name() == "reference"
    calls.clear()
    monkeypatch.setenv("SAE_KERNELS", "auto")
    kernels.sparse_decode(*inputs)
    assert not calls
    assert kernels.backend_name() == ("torch" if build.cpu_library() is None else "cpu")
    monkeypatch.setenv("SAE_KERNELS", "torch")
    assert kernels.backend_name() == "torch"
    monkeypatch.setenv("SAE_KERNELS", "fast")
    with pytest.raises(ValueError, match="SAE_KERNELS"):
        kernels.sparse_decode(*inputs)


def test_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAE_KERNELS_CACHE", str(tmp_path))
    assert build._load("false", build.KERNEL_DIR / "sparse_cpu.cpp", build.CPU_FLAGS) is None
    assert build._load(None, build.KERNEL_DIR / "sparse_cpu.cpp", build.CPU_FLAGS) is None
    assert "pure-torch" in caplog.text


def test_topk_sae_gradients_match_reference(monkeypatch):
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config("topk", d_in=12, d_sae=40, k=5))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x_BD = torch.randn(16, 12)
    dead_F = torch.zeros(40, dtype=torch.bool)
    dead_F[::3] = True
    results = []
    for mode in ("reference", "auto"):
        monkeypatch.setenv("SAE_KERNELS", mode)
        sae.zero_grad()
        out = sae(x_BD, dead_mask_F=dead_F)
        out.loss().backward()
        results.append([out.x_hat_BD, out.latents_BF, out.loss()] + [p.grad.clone() for p in sae.parameters()])
    assert_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def sae_with_noisy_biases(arch: str, **fields):
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=12, d_sae=40, **fields))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name.startswith("b_"):
                param.normal_()
    return sae


VARIANTS = [(arch, {}) for arch in sae_core.names()] + [
    ("crosscoder", {"activation": "topk", "k": 5}), ("crosscoder", {"n_sources": 3}),
    ("transcoder", {"activation": "batchtopk", "k": 5}), ("transcoder", {"activation": "relu"}),
    ("skip_transcoder", {"activation": "jumprelu"}),
]


@pytest.mark.parametrize("arch,fields", VARIANTS)
def test_every_architecture_matches_the_reference(monkeypatch, arch, fields):
    """Train-mode forward, loss and every gradient with the fast kernels equal the eager reference's."""
    sae = sae_with_noisy_biases(arch, **fields)
    x_BD, dead_F = torch.randn(33, *([3] if fields.get("n_sources") else []), 12), torch.zeros(40, dtype=torch.bool)
    dead_F[::3] = True
    results = []
    # Variable-L0 architectures: the dense path under the reference is the oracle of the forced sparse path.
    for mode, sparse in (("reference", False), ("auto", True), ("torch", True), ("auto", False)):
        monkeypatch.setenv("SAE_KERNELS", mode)
        if hasattr(sae, "path"):
            sae.path.fraction = 0.0 if sparse else 1.0
        sae.zero_grad()
        out = sae(x_BD, dead_mask_F=dead_F)
        assert out.active is not None or not (sparse and hasattr(sae, "path"))
        out.loss().backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in sae.parameters()]
        results.append([out.x_hat_BD, out.latents_BF, out.loss(), out.aux, *grads])
    for other in results[1:]:
        assert_all_close(results[0], other, rtol=1e-4, atol=1e-5)


def test_matryoshka_sparse_prefixes_match_dense_definition():
    from sae_core.architectures.matryoshka import prefix_reconstructions, sparse_prefix_reconstructions

    sae = sae_with_noisy_biases("matryoshka", k=6, prefixes=[3, 10, 11, 40])
    x_BD = torch.randn(17, 12)
    latents_BF = sae.activation(sae.pre_acts(x_BD)).detach()  # the dense definition, from scratch
    dense = [r.detach() for r in prefix_reconstructions(latents_BF, sae.W_dec, sae.b_dec, [3, 10, 11, 40])]
    weights = [torch.randn(17, 12, generator=torch.Generator().manual_seed(g)) for g in range(4)]
    results = []
    for fn in (prefix_reconstructions, sparse_prefix_reconstructions):
        sae.zero_grad()
        active = sae.active(x_BD)
        recons = fn(active.dense() if fn is prefix_reconstructions else active, sae.W_dec, sae.b_dec, [3, 10, 11, 40])
        sum((r * w).sum() for r, w in zip(recons, weights, strict=True)).backward()
        results.append([*(r.detach() for r in recons), sae.W_dec.grad.clone(), sae.W_enc.grad.clone(), sae.b_dec.grad.clone()])
    assert_all_close(results[0][:4], dense, rtol=1e-5, atol=1e-5)
    assert_all_close(results[0], results[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_x_hat", [True, False])
def test_matryoshka_prefix_errors_match_autograd_of_the_definition(use_x_hat):
    """PrefixErrors (the in-place prefix MSEs the module trains on) against running sums and mse_loss."""
    from sae_core.architectures.base import mse_loss
    from sae_core.architectures.matryoshka import PrefixErrors

    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(4, 9, 7, generator=gen), torch.randn(9, 7, generator=gen), torch.randn(7, generator=gen)]
    w_G, w_BD = torch.randn(4, generator=gen), torch.randn(9, 7, generator=gen)
    results = []
    for fused in (True, False):
        partial_GBD, x_BD, b_dec_D = (t.clone().requires_grad_() for t in leaves)
        if fused:
            mse_G, x_hat_BD = PrefixErrors.apply(partial_GBD, x_BD, b_dec_D)
        else:
            recons = list(torch.cumsum(partial_GBD, 0) + b_dec_D)
            mse_G, x_hat_BD = torch.stack([mse_loss(r, x_BD) for r in recons]), recons[-1]
        loss = (mse_G * w_G).sum() + ((x_hat_BD * w_BD).sum() if use_x_hat else 0)
        loss.backward()
        results.append([mse_G, x_hat_BD, partial_GBD.grad, x_BD.grad, b_dec_D.grad])
    assert_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cuda_matches_reference(monkeypatch, dtype, tol):
    monkeypatch.setenv("SAE_KERNELS", "auto")
    assert kernels.backend_name("cuda") == "cuda"
    inputs = [t.detach().cuda().requires_grad_(t.requires_grad) for t in decode_inputs(67, 9, 300, 577, dtype)]
    out, grads = value_and_grads(kernels.sparse_decode, inputs)
    exact = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_out, ref_grads = value_and_grads(kernels.sparse_decode_reference, exact)
    assert_all_close([out, *grads], [ref_out, *ref_grads], rtol=tol, atol=tol * 4)
    x_BD, W_enc_DF, b_enc_F = (t.detach().cuda().float().requires_grad_() for t in encode_inputs(40, 33, 500))
    enc = [value_and_grads(lambda x, W, b, fn=fn: fn(x, W, b, 16)[0].sum(1), (x_BD, W_enc_DF, b_enc_F))
           for fn in (kernels.topk_encode, kernels.topk_encode_reference)]
    assert_all_close([enc[0][0], *enc[0][1]], [enc[1][0], *enc[1][1]], rtol=1e-5, atol=1e-5)
