"""The CUDA kernels of the `fmoe` ops (csrc/cuda/) against the CPU kernels (csrc/cpu/), which
tests/ops/test_ops.py holds against the contracts in csrc/fmoe_ops.h.

Every op runs on random inputs of several sizes (0 tokens, dropped slots, one expert, many experts,
fp32 / bf16 / fp16 / fp64) on the GPU and on the CPU: the index ops must agree bit for bit, the
float ops to a tolerance; every CUDA op must give the same bits on two runs (determinism).

Skipped where CUDA is not available (the kernels are compiled there but cannot run); on a GPU
machine a cuda library that fails to build fails these tests.
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available: the CUDA kernels cannot run here")

DEV = "cuda"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def _cuda_ops_loaded():
    from fastmoe_megatron import _native

    for var in ("FMOE_NATIVE", "FMOE_CUDA_OPS"):
        if os.environ.get(var, "auto").strip().lower() == "0":
            pytest.skip(f"native CUDA ops disabled by {var}=0")
    ok = _native.load("cuda")
    assert ok, f"the native CUDA ops did not build or load: {_native.status()}"


def ops():
    return torch.ops.fmoe


def tol(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}[dtype]


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.cpu().view(torch.uint8) if a.is_floating_point() else a.cpu(),
                       b.cpu().view(torch.uint8) if b.is_floating_point() else b.cpu())


def random_idx(gen, T, K, E, drop=0.2):
    if E == 0:
        return torch.full((T, K), -1, dtype=torch.int64)
    idx = torch.randint(0, E, (T, K), generator=gen, dtype=torch.int64)
    if drop > 0:
        idx[torch.rand(T, K, generator=gen) < drop] = -1
    return idx


# (T, K, E, drop): 0 tokens, one token, all dropped, one expert, many experts, large.
ROUTINGS = [
    (0, 2, 4, 0.0),
    (1, 1, 1, 0.0),
    (5, 2, 3, 1.0),
    (6, 2, 0, 1.0),          # no experts at all (every slot dropped)
    (37, 1, 1, 0.3),
    (64, 2, 8, 0.0),
    (300, 2, 16, 0.25),
    (1000, 4, 600, 0.1),
    (4096, 2, 9000, 0.1),    # more experts than expert_count's shared-memory histogram holds
    (40000, 2, 64, 0.05),    # many chunks in the counting sort
    (2500, 2, 200000, 0.1),  # long, multi-tile chunks (huge expert count)
]


def routing(i, T, K, E, drop):
    gen = torch.Generator().manual_seed(1000 + i)
    return random_idx(gen, T, K, E, drop)


@pytest.mark.parametrize("i,case", list(enumerate(ROUTINGS)))
def test_expert_count(i, case):
    T, K, E, drop = case
    idx = routing(i, T, K, E, drop)
    want = ops().expert_count(idx, E)
    got = ops().expert_count(idx.to(DEV), E)
    assert got.device.type == "cuda" and got.dtype == torch.int64
    assert_same_bits(got, want)
    assert_same_bits(ops().expert_count(idx.to(DEV), E), got)


@pytest.mark.parametrize("counts_on", ["cpu", "cuda"])
@pytest.mark.parametrize("i,case", list(enumerate(ROUTINGS)))
def test_assign_pos(i, case, counts_on):
    T, K, E, drop = case
    idx = routing(i, T, K, E, drop)
    counts = ops().expert_count(idx, E)
    pos, inv = ops().assign_pos(idx.reshape(-1), counts)
    gpos, ginv = ops().assign_pos(idx.reshape(-1).to(DEV), counts.to(counts_on))
    assert gpos.device.type == "cuda" and ginv.device.type == "cuda"
    assert_same_bits(gpos, pos)
    assert_same_bits(ginv, inv)
    gpos2, ginv2 = ops().assign_pos(idx.reshape(-1).to(DEV), counts.to(counts_on))
    assert_same_bits(gpos2, gpos)
    assert_same_bits(ginv2, ginv)


def test_assign_pos_after_expert_count_on_gpu():
    """The layer's path: counts come from the CUDA expert_count and stay on the GPU."""
    idx = routing(7, 513, 2, 5, 0.2).to(DEV)
    counts = ops().expert_count(idx, 5)
    pos, inv = ops().assign_pos(idx.reshape(-1), counts)
    want_pos, want_inv = ops().assign_pos(idx.reshape(-1).cpu(), counts.cpu())
    assert_same_bits(pos, want_pos)
    assert_same_bits(inv, want_inv)


@pytest.mark.parametrize("keep_on", ["cpu", "cuda"])
@pytest.mark.parametrize("i,case", list(enumerate(ROUTINGS)))
def test_prune_gate_by_capacity(i, case, keep_on):
    T, K, E, drop = case
    idx = routing(i, T, K, E, drop)
    gen = torch.Generator().manual_seed(2000 + i)
    hi = max(2, 2 * T * K // max(E, 1))
    keep = torch.randint(-1, hi, (E,), generator=gen, dtype=torch.int64)  # includes 0 and -1
    want = ops().prune_gate_by_capacity(idx, keep)
    got = ops().prune_gate_by_capacity(idx.to(DEV), keep.to(keep_on))
    assert got.device.type == "cuda"
    assert_same_bits(got, want)
    assert_same_bits(ops().prune_gate_by_capacity(idx.to(DEV), keep.to(keep_on)), got)


@pytest.mark.parametrize("cap_on", ["cpu", "cuda"])
@pytest.mark.parametrize("W,E", [(1, 1), (1, 4), (2, 3), (4, 8), (8, 257), (3, 0)])
def test_limit_by_capacity(W, E, cap_on):
    gen = torch.Generator().manual_seed(W * 100 + E)
    gec = torch.randint(0, 20, (W * E,), generator=gen, dtype=torch.int64)
    cap = torch.randint(-3, 40, (E,), generator=gen, dtype=torch.int64)
    want = ops().limit_by_capacity(gec, cap, E, W)
    got = ops().limit_by_capacity(gec.to(DEV), cap.to(cap_on), E, W)
    assert got.device.type == "cuda"
    assert_same_bits(got, want)
    assert_same_bits(ops().limit_by_capacity(gec.to(DEV), cap.to(cap_on), E, W), got)


# ---------------------------------------------------------------------------- float ops

# (T, K, E, D, drop)
ROW_CASES = [
    (0, 2, 4, 8, 0.0),
    (1, 1, 1, 1, 0.0),
    (5, 2, 3, 7, 1.0),
    (33, 2, 4, 33, 0.2),
    (128, 3, 8, 64, 0.3),
    (700, 2, 16, 300, 0.1),
    (64, 1, 2, 1024, 0.0),
]


def plan(i, T, K, E, drop):
    idx = routing(50 + i, T, K, E, drop)
    counts = ops().expert_count(idx, E)
    pos, inv = ops().assign_pos(idx.reshape(-1), counts)
    return pos, inv


def rand(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("i,case", list(enumerate(ROW_CASES)))
def test_scatter_rows(i, case, dtype, weighted):
    T, K, E, D, drop = case
    pos, inv = plan(i, T, K, E, drop)
    x = rand((T, D), dtype, i)
    w = rand((T, K), torch.float32, 100 + i) if weighted else None
    want = ops().scatter_rows(x, pos, K, w)
    wd = w.to(DEV) if weighted else None
    got = ops().scatter_rows(x.to(DEV), pos.to(DEV), K, wd)
    assert got.device.type == "cuda" and got.dtype == dtype
    if weighted:
        torch.testing.assert_close(got.cpu(), want, rtol=tol(dtype)[0], atol=tol(dtype)[1])
    else:
        assert_same_bits(got, want)  # a pure copy (and zero rows)
    assert_same_bits(ops().scatter_rows(x.to(DEV), pos.to(DEV), K, wd), got)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("i,case", list(enumerate(ROW_CASES)))
def test_gather_rows(i, case, dtype, weighted):
    T, K, E, D, drop = case
    pos, inv = plan(i, T, K, E, drop)
    buf = rand((T * K, D), dtype, 10 + i)
    w = rand((T, K), torch.float32, 200 + i) if weighted else None
    want = ops().gather_rows(buf, inv, K, w)
    wd = w.to(DEV) if weighted else None
    got = ops().gather_rows(buf.to(DEV), inv.to(DEV), K, wd)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == (T, D)
    torch.testing.assert_close(got.cpu(), want, rtol=tol(dtype)[0], atol=tol(dtype)[1])
    assert_same_bits(ops().gather_rows(buf.to(DEV), inv.to(DEV), K, wd), got)


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("i,case", list(enumerate(ROW_CASES)))
def test_gather_weight_grad(i, case, dtype):
    T, K, E, D, drop = case
    pos, inv = plan(i, T, K, E, drop)
    gy = rand((T, D), dtype, 20 + i)
    buf = rand((T * K, D), dtype, 30 + i)
    want = ops().gather_weight_grad(gy, buf, inv, K)
    got = ops().gather_weight_grad(gy.to(DEV), buf.to(DEV), inv.to(DEV), K)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == (T * K,)
    rtol, atol = tol(dtype)
    # A dot product of D terms: the summation orders differ (serial on the CPU, a warp tree here).
    torch.testing.assert_close(got.cpu(), want, rtol=rtol * 4, atol=atol * max(1, D) ** 0.5)
    assert (got.cpu()[inv < 0] == 0).all()
    assert_same_bits(ops().gather_weight_grad(gy.to(DEV), buf.to(DEV), inv.to(DEV), K), got)


def test_gather_weight_grad_casts_buf_to_grad_dtype():
    pos, inv = plan(3, 40, 2, 4, 0.2)
    gy = rand((40, 16), torch.bfloat16, 1)
    buf = rand((80, 16), torch.float32, 2)
    want = ops().gather_weight_grad(gy, buf, inv, 2)
    got = ops().gather_weight_grad(gy.to(DEV), buf.to(DEV), inv.to(DEV), 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu(), want, rtol=4e-2, atol=4e-2)


def test_ops_follow_the_current_stream():
    """Inside a side stream, the input is produced on that stream behind a long spin
    (``torch.cuda._sleep``): an op that ran on any other stream would read it before it is there.
    The results are read after the side stream is synchronized."""
    pos, inv = plan(4, 300, 2, 8, 0.2)
    x = rand((300, 64), torch.float32, 5)
    want = ops().scatter_rows(x, pos, 2, None)
    s = torch.cuda.Stream()
    xd, posd, invd = x.to(DEV), pos.to(DEV), inv.to(DEV)
    torch.cuda.current_stream().synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles on s
        xs = xd * 1  # the input, ready only after the spin
        got = ops().scatter_rows(xs, posd, 2, None)
        back = ops().gather_rows(got, invd, 2, None)
    s.synchronize()
    assert_same_bits(got, want)
    torch.testing.assert_close(back.cpu(), ops().gather_rows(want, inv, 2, None))


def test_grid_stride_loops():
    """Sizes past one launch's blocks, so that every kernel's grid-stride loop runs: scatter and
    gather over more than 2^20 rows, gather_weight_grad over more than 2^23 slots, expert_count
    and assign_pos over more keys than the shared-memory histogram's 1024 x 256."""
    T, K, E = 4_300_000, 2, 8  # 8.6M slots
    idx = routing(11, T, K, E, 0.05)
    counts = ops().expert_count(idx, E)
    got_counts = ops().expert_count(idx.to(DEV), E)
    assert_same_bits(got_counts, counts)
    pos, inv = ops().assign_pos(idx.reshape(-1), counts)
    gpos, ginv = ops().assign_pos(idx.reshape(-1).to(DEV), got_counts)
    assert_same_bits(gpos, pos)
    assert_same_bits(ginv, inv)
    x = rand((T, 1), torch.float32, 12)
    buf = ops().scatter_rows(x, pos, K, None)
    gbuf = ops().scatter_rows(x.to(DEV), gpos, K, None)
    assert_same_bits(gbuf, buf)
    w = rand((T, K), torch.float32, 13)
    torch.testing.assert_close(ops().gather_rows(gbuf, ginv, K, w.to(DEV)).cpu(),
                               ops().gather_rows(buf, inv, K, w), rtol=1e-5, atol=1e-5)
    gy = rand((T, 1), torch.float32, 14)
    torch.testing.assert_close(ops().gather_weight_grad(gy.to(DEV), gbuf, ginv, K).cpu(),
                               ops().gather_weight_grad(gy, buf, inv, K), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    """Strided views (every other column, a transposed weight) give the results of their
    contiguous copies."""
    pos, inv = plan(5, 200, 2, 8, 0.1)
    wide = rand((200, 64), torch.float32, 15).to(DEV)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    assert_same_bits(ops().scatter_rows(x, pos.to(DEV), 2, None),
                     ops().scatter_rows(x.contiguous(), pos.to(DEV), 2, None))
    counts = torch.tensor([50, 0, 70, 80])
    xs = rand((200, 32), torch.float32, 16).to(DEV)
    w_t = rand((4, 32, 24), torch.float32, 17).to(DEV).transpose(1, 2)  # [E, out 24, in 32]
    assert not w_t.is_contiguous()
    torch.testing.assert_close(ops().grouped_mm(xs, w_t, counts, None),
                               ops().grouped_mm(xs, w_t.contiguous(), counts, None),
                               rtol=1e-6, atol=1e-6)


def test_assign_pos_checks_gpu_counts_without_slots():
    """No slots but counts on the GPU that are not zero: an error, as on the CPU."""
    with pytest.raises(RuntimeError, match="counts sum to more than the 0 rows"):
        ops().assign_pos(torch.empty(0, dtype=torch.int64), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="counts sum to more than the 0 rows"):
        ops().assign_pos(torch.empty(0, dtype=torch.int64, device=DEV),
                         torch.tensor([3], device=DEV))


# ---------------------------------------------------------------------------- grouped GEMM

# (counts, in_feat, out_feat, extra trailing rows)
GEMM_CASES = [
    ([0, 0, 0], 8, 4, 0),
    ([3], 5, 7, 0),
    ([4, 0, 9, 1], 16, 24, 5),
    ([0, 17, 0, 33, 2], 64, 32, 0),
    ([128, 64, 256, 0], 96, 80, 7),
]


def gemm_inputs(i, counts, I, O, extra, dtype):
    N = sum(counts) + extra
    E = len(counts)
    x = rand((N, I), dtype, 300 + i)
    w = rand((E, O, I), dtype, 400 + i) * 0.2
    b = rand((E, O), dtype, 500 + i)
    gy = rand((N, O), dtype, 600 + i)
    return x, w, b, gy, torch.tensor(counts, dtype=torch.int64)


def gemm_tol(dtype, I):
    rtol, atol = tol(dtype)
    if dtype == torch.float32:
        return 1e-4, 1e-4 * I
    return rtol * 2, atol * I ** 0.5 * 2


@pytest.mark.parametrize("counts_on", ["cpu", "cuda"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("i,case", list(enumerate(GEMM_CASES)))
def test_grouped_mm(i, case, dtype, with_bias, counts_on):
    counts_l, I, O, extra = case
    x, w, b, _, counts = gemm_inputs(i, counts_l, I, O, extra, dtype)
    bias = b if with_bias else None
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # the reference's precision
    want = ops().grouped_mm(x.to(wide), w.to(wide), counts, b.to(wide) if with_bias else None)
    got = ops().grouped_mm(x.to(DEV), w.to(DEV), counts.to(counts_on),
                           bias.to(DEV) if with_bias else None)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == (x.shape[0], O)
    rtol, atol = gemm_tol(dtype, I)
    torch.testing.assert_close(got.cpu().to(wide), want, rtol=rtol, atol=atol)
    assert (got[sum(counts_l):] == 0).all()
    again = ops().grouped_mm(x.to(DEV), w.to(DEV), counts.to(counts_on),
                             bias.to(DEV) if with_bias else None)
    assert_same_bits(again, got)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True),
                                  (False, False, True), (False, False, False)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("i,case", list(enumerate(GEMM_CASES)))
def test_grouped_mm_backward(i, case, dtype, mask):
    counts_l, I, O, extra = case
    x, w, _, gy, counts = gemm_inputs(i, counts_l, I, O, extra, dtype)
    want = ops().grouped_mm_backward(gy.float(), x.float(), w.float(), counts, list(mask))
    got = ops().grouped_mm_backward(gy.to(DEV), x.to(DEV), w.to(DEV), counts, list(mask))
    inner = [O, max(1, sum(counts_l)), max(1, sum(counts_l))]  # summed terms per output
    for k, (g, r) in enumerate(zip(got, want)):
        if not mask[k]:
            assert g.numel() == 0
            continue
        assert g.device.type == "cuda" and g.dtype == dtype and g.shape == r.shape
        rtol, atol = gemm_tol(dtype, inner[k])
        torch.testing.assert_close(g.cpu().float(), r, rtol=rtol, atol=atol)
    if mask[0]:
        assert (got[0][sum(counts_l):] == 0).all()
    again = ops().grouped_mm_backward(gy.to(DEV), x.to(DEV), w.to(DEV), counts, list(mask))
    for a, g in zip(again, got):
        assert_same_bits(a, g)


def test_grouped_mm_waits_for_its_side_streams():
    """Products large enough to outlast the copy that follows them, behind a spin on the current
    stream: without the current stream waiting for the side streams, the copy to the host would
    read rows not yet written."""
    counts = torch.tensor([2048] * 8)
    I, O = 1024, 1024
    x = rand((int(counts.sum()), I), torch.float32, 18)
    w = rand((8, O, I), torch.float32, 19) * 0.05
    gy = rand((int(counts.sum()), O), torch.float32, 20)
    want = ops().grouped_mm(x, w, counts, None)
    want_gx, want_gw, _ = ops().grouped_mm_backward(gy, x, w, counts, [True, True, False])
    xd, wd, gyd = x.to(DEV), w.to(DEV), gy.to(DEV)
    torch.cuda.synchronize()
    for _ in range(3):
        torch.cuda._sleep(100_000_000)
        got = ops().grouped_mm(xd, wd, counts, None).cpu()  # the copy runs on the current stream
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * I ** 0.5)
        torch.cuda._sleep(100_000_000)
        gx, gw, _ = ops().grouped_mm_backward(gyd, xd, wd, counts, [True, True, False])
        torch.testing.assert_close(gx.cpu(), want_gx, rtol=1e-4, atol=1e-4 * O ** 0.5)
        torch.testing.assert_close(gw.cpu(), want_gw, rtol=1e-4, atol=1e-4 * 2048 ** 0.5)


def test_dispatch_round_trip_through_autograd_ops():
    """The Python autograd ops on CUDA tensors take the native CUDA kernels and match the CPU."""
    from fastmoe_megatron import ops as fops

    assert fops.backend_name("cuda") == "native"
    T, K, E, D = 50, 2, 6, 32
    idx = routing(9, T, K, E, 0.1)
    x = rand((T, D), torch.float32, 9)
    w = torch.rand(T, K)
    outs = []
    for dev in ("cpu", DEV):
        # copies: x.to("cpu") would be x itself, and the cuda copy of it then a non-leaf
        xi = x.to(dev, copy=True).requires_grad_()
        wi = w.to(dev, copy=True).requires_grad_()
        counts = fops.expert_count(idx.to(dev), E)
        pos, inv = fops.assign_pos(idx.to(dev), counts)
        buf = fops.scatter_rows(xi, pos, inv, K)
        y = fops.gather_rows(buf * 2, pos, inv, K, wi)
        y.square().sum().backward()
        outs.append((y.detach().cpu(), xi.grad.cpu(), wi.grad.cpu()))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
