"""The dispatch ops (contracts in csrc/fmoe_ops.h): the native CPU kernels and the pure-PyTorch
fallback (fastmoe_megatron/ops/reference.py), each held against a brute-force Python loop written
here from the contract, on random inputs and edge cases (0 slots, every slot dropped, one expert,
many experts); the autograd ops under torch.autograd.gradcheck in float64 on both back ends; and
the errors that bad inputs raise.
"""
from __future__ import annotations

import pytest
import torch

from fastmoe_megatron import ops
from fastmoe_megatron.ops import native, reference
from tests import reference as ref

BACKENDS = ["native", "torch"]


@pytest.fixture(scope="module", autouse=True)
def _native_loaded():
    # The native functions call torch.ops.fmoe, which exists once the library is loaded.
    assert native.available(), "the native CPU ops did not build or load"


# The two kernel sets; both implement the same contracts.
IMPLS = [pytest.param(native, id="native"), pytest.param(reference, id="torch")]


# ---------------------------------------------------------------------------- brute force

def bf_expert_count(idx, E):
    counts = [0] * E
    for e in idx.reshape(-1).tolist():
        if e >= 0:
            counts[e] += 1
    return torch.tensor(counts, dtype=torch.int64)


def bf_assign_pos(idx, E):
    flat = idx.reshape(-1).tolist()
    pos = [s for e in range(E) for s, v in enumerate(flat) if v == e]
    inv = [-1] * len(flat)
    for r, s in enumerate(pos):
        inv[s] = r
    pos += [-1] * (len(flat) - len(pos))
    return torch.tensor(pos, dtype=torch.int64), torch.tensor(inv, dtype=torch.int64)


def bf_scatter(x, pos, K, w=None):
    """The weight is taken in fp32 (fp64 for fp64 rows) and the product rounded once."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(pos.numel(), x.shape[1], dtype=x.dtype)
    for r, s in enumerate(pos.tolist()):
        if s >= 0:
            out[r] = x[s // K] if w is None else (x[s // K].to(acc) * w[s].to(acc)).to(x.dtype)
    return out


def bf_gather(buf, inv, K, w=None):
    T = inv.numel() // K
    out = torch.zeros(T, buf.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            r = int(inv[t * K + j])
            if r >= 0:
                out[t] += buf[r].double() * (float(w[t * K + j]) if w is not None else 1.0)
    return out


def bf_weight_grad(gy, buf, inv, K):
    out = torch.zeros(inv.numel(), dtype=torch.float64)
    for s, r in enumerate(inv.tolist()):
        if r >= 0:
            out[s] = torch.dot(gy[s // K].double(), buf[r].double())
    return out


def bf_limit(gec, cap, E, W):
    out = torch.zeros(W * E, dtype=torch.int64)
    for e in range(E):
        left = max(0, int(cap[e]))
        for w in range(W):
            take = min(left, int(gec[w * E + e]))
            out[w * E + e] = take
            left -= take
    return out


def bf_grouped_mm(x, w, counts, b=None):
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    r = 0
    for e, n in enumerate(counts.tolist()):
        for _ in range(n):
            out[r] = w[e].double() @ x[r].double() + (b[e].double() if b is not None else 0)
            r += 1
    return out


# ---------------------------------------------------------------------------- routing cases

def make_idx(T, K, E, drop=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, E, (T, K), generator=g)
    return idx.masked_fill(torch.rand(T, K, generator=g) < drop, -1)


CASES = {
    "zero_slots": (make_idx(0, 2, 4), 4),
    "all_dropped": (torch.full((6, 3), -1, dtype=torch.int64), 5),
    "one_expert": (make_idx(9, 1, 1), 1),
    "one_expert_topk2": (make_idx(7, 2, 1, drop=0.0), 1),
    "small": (make_idx(13, 2, 4), 4),
    "no_drops": (make_idx(11, 3, 3, drop=0.0), 3),
    "many_experts": (make_idx(40, 4, 128), 128),
    "tail_experts_empty": (make_idx(20, 2, 3, drop=0.1), 9),  # experts 3..8 get nothing
}
CASE_IDS = list(CASES)


# ---------------------------------------------------------------------------- count / positions

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_expert_count(impl, case):
    idx, E = CASES[case]
    got = impl.expert_count(idx, E)
    assert got.dtype == torch.int64 and got.shape == (E,)
    assert torch.equal(got, bf_expert_count(idx, E))
    # Any shape of idx is counted as a flat list.
    assert torch.equal(impl.expert_count(idx.t().contiguous(), E), got)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_assign_pos(impl, case):
    idx, E = CASES[case]
    counts = bf_expert_count(idx, E)
    pos, inv = impl.assign_pos(idx.reshape(-1), counts)
    want_pos, want_inv = bf_assign_pos(idx, E)
    assert pos.dtype == inv.dtype == torch.int64
    assert torch.equal(pos, want_pos)
    assert torch.equal(inv, want_inv)
    # pos and inv are inverse permutations on the kept slots; dropped slots have inv = -1.
    flat = idx.reshape(-1)
    total = int(counts.sum())
    assert (pos[total:] == -1).all() and (pos[:total] >= 0).all()
    assert torch.equal(inv[pos[:total]], torch.arange(total))
    kept = (flat >= 0).nonzero().squeeze(1)
    assert torch.equal(pos[inv[kept]], kept)
    assert (inv[flat < 0] == -1).all()
    # Stable: grouped by ascending expert, slots ascending inside each expert.
    experts = flat[pos[:total]]
    assert (experts[1:] >= experts[:-1]).all()
    same = experts[1:] == experts[:-1]
    assert (pos[1:total][same] > pos[:max(total - 1, 0)][same]).all()


def test_assign_pos_stable_by_hand():
    # slots:        0  1  2   3  4  5  6
    idx = torch.tensor([2, 0, 2, -1, 0, 2, 1])
    pos, inv = native.assign_pos(idx, torch.tensor([2, 1, 3]))
    assert pos.tolist() == [1, 4, 6, 0, 2, 5, -1]
    assert inv.tolist() == [3, 0, 4, -1, 1, 5, 2]
    pos2, inv2 = reference.assign_pos(idx, torch.tensor([2, 1, 3]))
    assert torch.equal(pos, pos2) and torch.equal(inv, inv2)


# ---------------------------------------------------------------------------- scatter / gather

DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float32, torch.float64, torch.bfloat16)]


def _plan(case, D=5, dtype=torch.float32, seed=0):
    idx, E = CASES[case]
    T, K = idx.shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = torch.rand(T * K, generator=g).to(dtype) + 0.5
    pos, inv = bf_assign_pos(idx, E)
    return idx, K, x, w, pos, inv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_scatter_rows(impl, case, weighted, dtype):
    idx, K, x, w, pos, inv = _plan(case, dtype=dtype)
    w = w if weighted else None
    got = impl.scatter_rows(x, pos, K, w)
    assert got.dtype == dtype and got.shape == (pos.numel(), x.shape[1])
    # One product per element, rounded once: exact.
    assert torch.equal(got, bf_scatter(x, pos, K, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_gather_rows(impl, case, weighted, dtype):
    idx, K, x, w, pos, inv = _plan(case, dtype=dtype)
    buf = bf_scatter(x, pos, K)  # [S, D]
    w = w if weighted else None
    got = impl.gather_rows(buf, inv, K, w)
    assert got.dtype == dtype and got.shape == (idx.shape[0], x.shape[1])
    want = bf_gather(buf, inv, K, w)
    # fp32 accumulation for fp32/bf16 (one rounding at the end); fp64 must stay fp64.
    tol = {torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float32: dict(rtol=1e-6, atol=1e-6),
           torch.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]
    torch.testing.assert_close(got.double(), want, **tol)
    # A token whose slots are all dropped comes back exactly zero.
    dead = (idx < 0).all(1)
    assert torch.count_nonzero(got[dead]) == 0


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_gather_weight_grad(impl, case, dtype):
    idx, K, x, w, pos, inv = _plan(case, dtype=dtype)
    buf = torch.randn(pos.numel(), x.shape[1], dtype=dtype)
    gy = torch.randn(idx.shape[0], x.shape[1], dtype=dtype)
    got = impl.gather_weight_grad(gy, buf, inv, K)
    assert got.shape == (idx.numel(),) and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), bf_weight_grad(gy, buf, inv, K), rtol=tol, atol=tol)
    assert (got[inv < 0] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_weights_are_not_rounded_to_the_rows_dtype(impl, dtype):
    """The gate's fp32 scores weight bf16/fp16 rows as they are (both back ends alike)."""
    idx, K, x, w, pos, inv = _plan("small", dtype=dtype)
    w = torch.rand(w.numel(), generator=torch.Generator().manual_seed(5),
                   dtype=torch.float32) + 0.5
    assert not torch.equal(w.to(dtype).float(), w)  # rounding them would change them
    assert torch.equal(impl.scatter_rows(x, pos, K, w), bf_scatter(x, pos, K, w))
    buf = bf_scatter(x, pos, K)
    got = impl.gather_rows(buf, inv, K, w)
    # Only the final rounding to the rows' dtype: within one unit in its last place.
    torch.testing.assert_close(got.double(), bf_gather(buf, inv, K, w).to(dtype).double(),
                               rtol=1e-2, atol=0)
    exact = impl.gather_rows(buf.float(), inv, K, w)  # the same sums, kept in fp32
    assert torch.equal(got, exact.to(dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_values_stay_out_of_dropped_slots(impl, bad):
    """Dropped slots read nothing: a NaN or Inf in a row, weight or gradient that no kept slot
    uses must not reach the outputs (an all-dropped token is exactly zero)."""
    # Slots 0..3 of 2 tokens (K=2); token 1 has both slots dropped.
    inv = torch.tensor([1, 0, -1, -1])
    buf = torch.tensor([[1.0, 2.0], [3.0, 4.0], [bad, 5.0]])  # row 2 is a padding row
    buf0 = torch.tensor([[bad, 2.0], [3.0, 4.0]])  # row 0 holds the bad value
    w = torch.tensor([0.5, 0.25, bad, bad])
    assert torch.equal(impl.gather_rows(buf0[:1].new_zeros(0, 2), torch.full((4,), -1), 2, w),
                       torch.zeros(2, 2))
    out = impl.gather_rows(buf, inv, 2, w)
    assert torch.equal(out[1], torch.zeros(2))
    out = impl.gather_rows(torch.tensor([[3.0, 4.0], [bad, 1.0]]), torch.tensor([0, -1, -1, -1]),
                           2, w)
    assert torch.equal(out, torch.tensor([[1.5, 2.0], [0.0, 0.0]]))
    gy = torch.tensor([[1.0, 1.0], [bad, bad]])
    gw = impl.gather_weight_grad(gy, buf0, inv, 2)
    assert torch.equal(gw[2:], torch.zeros(2)) and gw[0] == 3.0 + 4.0
    x = torch.tensor([[bad, 1.0], [2.0, 3.0]])
    padded = torch.tensor([3, 2, -1, -1])  # slots of token 1 only; rows 2, 3 are padding
    got = impl.scatter_rows(x, padded, 2, w.clone().fill_(0.5))
    assert torch.equal(got, torch.tensor([[1.0, 1.5], [1.0, 1.5], [0.0, 0.0], [0.0, 0.0]]))
    got = impl.scatter_rows(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), padded, 2, w)
    assert torch.equal(got[2:], torch.zeros(2, 2)) and not torch.isfinite(got[:2]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_width_rows(impl):
    inv = torch.tensor([0, -1, 1, 2])
    assert impl.gather_rows(torch.zeros(3, 0), inv, 2, torch.ones(4)).shape == (2, 0)
    assert impl.scatter_rows(torch.zeros(2, 0), torch.tensor([0, 2, 3, -1]), 2).shape == (4, 0)


@pytest.mark.parametrize("case", ["small", "many_experts", "all_dropped"])
def test_native_and_fallback_bitwise_on_index_ops(case):
    idx, E = CASES[case]
    c1, c2 = native.expert_count(idx, E), reference.expert_count(idx, E)
    assert torch.equal(c1, c2)
    for a, b in zip(native.assign_pos(idx.reshape(-1), c1), reference.assign_pos(idx.reshape(-1), c2)):
        assert torch.equal(a, b)
    keep = torch.arange(E) % 3
    assert torch.equal(native.prune_gate_by_capacity(idx, keep),
                       reference.prune_gate_by_capacity(idx, keep))


# ---------------------------------------------------------------------------- capacity

LIMIT_CASES = [
    # (world_size, num_expert, seed, capacity kind)
    (1, 4, 0, "random"),
    (1, 1, 1, "zero"),
    (3, 2, 2, "random"),
    (4, 5, 3, "large"),
    (2, 3, 4, "zero"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("W,E,seed,kind", LIMIT_CASES)
def test_limit_by_capacity(impl, W, E, seed, kind):
    g = torch.Generator().manual_seed(seed)
    gec = torch.randint(0, 6, (W * E,), generator=g)
    cap = {"random": torch.randint(0, 10, (E,), generator=g),
           "zero": torch.zeros(E, dtype=torch.int64),
           "large": torch.full((E,), 1000, dtype=torch.int64)}[kind]
    got = impl.limit_by_capacity(gec, cap, E, W)
    assert torch.equal(got, bf_limit(gec, cap, E, W))
    per_expert = got.view(W, E).sum(0)
    assert (per_expert <= cap).all() and (got <= gec).all()
    if kind == "large":
        assert torch.equal(got, gec)


def test_limit_by_capacity_rank_order_by_hand():
    # 3 workers, 2 experts. Expert 0 has room for 5: worker 0 asks 4 (gets 4), worker 1 asks 3
    # (gets 1), worker 2 asks 2 (gets 0). Expert 1 has room for 10: everyone gets what they ask.
    gec = torch.tensor([4, 1, 3, 2, 2, 3])
    cap = torch.tensor([5, 10])
    for impl in (native, reference):
        assert impl.limit_by_capacity(gec, cap, 2, 3).tolist() == [4, 1, 1, 2, 0, 3]


def test_prune_gate_priority_by_hand():
    # Priority: first choices of tokens 0, 1, 2, then second choices of tokens 0, 1, 2.
    idx = torch.tensor([[0, 1],
                        [0, 0],
                        [1, 0]])
    keep = torch.tensor([2, 1])
    # Expert 0: slots (0,0), (1,0) kept; (1,1), (2,1) dropped. Expert 1: (2,0) kept, (0,1) dropped
    # although token 0 comes before token 2 (a first choice outranks any second choice).
    want = [[0, -1], [0, -1], [1, -1]]
    for impl in (native, reference):
        assert impl.prune_gate_by_capacity(idx, keep).tolist() == want
    assert ref.prune_by_capacity(idx, keep.tolist()).tolist() == want


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("keep_kind", ["zero", "small", "large"])
def test_prune_gate_by_capacity(impl, case, keep_kind):
    idx, E = CASES[case]
    g = torch.Generator().manual_seed(5)
    keep = {"zero": torch.zeros(E, dtype=torch.int64),
            "small": torch.randint(0, 4, (E,), generator=g),
            "large": torch.full((E,), 10 ** 6, dtype=torch.int64)}[keep_kind]
    got = impl.prune_gate_by_capacity(idx, keep)
    assert got.dtype == torch.int64 and got.shape == idx.shape
    assert torch.equal(got, ref.prune_by_capacity(idx, keep.tolist()))
    # Only drops, never moves; each expert within its budget.
    assert ((got == idx) | (got == -1)).all()
    assert (bf_expert_count(got, E) <= keep).all()
    if keep_kind == "large":
        assert torch.equal(got, idx)


# ---------------------------------------------------------------------------- grouped GEMM

GEMM_CASES = [
    # (counts, extra padding rows)
    ([3, 0, 2, 4], 0),
    ([0, 0, 0], 2),      # no rows at all: only padding
    ([5], 0),            # one expert
    ([1] * 12, 3),       # many experts, padding rows after the last block
    ([0, 7, 0], 1),
]


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts,pad", GEMM_CASES)
def test_grouped_mm(impl, counts, pad, bias, dtype):
    g = torch.Generator().manual_seed(len(counts) + pad)
    E, I, O = len(counts), 6, 4
    c = torch.tensor(counts, dtype=torch.int64)
    N = sum(counts) + pad
    x = torch.randn(N, I, generator=g).to(dtype)
    w = torch.randn(E, O, I, generator=g).to(dtype)
    b = torch.randn(E, O, generator=g).to(dtype) if bias else None
    got = impl.grouped_mm(x, w, c, b)
    assert got.shape == (N, O) and got.dtype == dtype
    torch.testing.assert_close(got.double(), bf_grouped_mm(x, w, c, b), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[sum(counts):]) == 0

    # Backward: gx = gy_e @ w_e, gw_e = gy_e^T x_e, gb_e = sum of gy_e (zero for an empty expert).
    gy = torch.randn(N, O, generator=g).to(dtype)
    gx, gw, gb = impl.grouped_mm_backward(gy, x, w, c, [True, True, True])
    want_gx = torch.zeros(N, I, dtype=torch.float64)
    want_gw = torch.zeros(E, O, I, dtype=torch.float64)
    want_gb = torch.zeros(E, O, dtype=torch.float64)
    r = 0
    for e, n in enumerate(counts):
        for _ in range(n):
            want_gx[r] = gy[r].double() @ w[e].double()
            want_gw[e] += torch.outer(gy[r].double(), x[r].double())
            want_gb[e] += gy[r].double()
            r += 1
    for name, a, b_ in (("gx", gx, want_gx), ("gw", gw, want_gw), ("gb", gb, want_gb)):
        torch.testing.assert_close(a.double(), b_, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # A mask entry that is false: that output is not computed and comes back empty.
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        outs = impl.grouped_mm_backward(gy, x, w, c, mask)
        for m, out, full in zip(mask, outs, (gx, gw, gb)):
            if m:
                assert torch.equal(out, full)
            else:
                assert out.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,pad", [([2, 0, 3], 1), ([0, 0], 2), ([4], 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_gradcheck(backend, counts, pad, bias):
    g = torch.Generator().manual_seed(0)
    E, I, O = len(counts), 3, 2
    N = sum(counts) + pad
    x = torch.randn(N, I, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, O, I, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, O, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    c = torch.tensor(counts, dtype=torch.int64)
    inputs = (x, w, b) if bias else (x, w)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x, w, b=None: ops.grouped_linear(x, w, c, b), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["small", "one_expert_topk2", "all_dropped", "zero_slots"])
def test_scatter_gather_gradcheck(backend, case):
    idx, E = CASES[case]
    T, K = idx.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 3, generator=g, dtype=torch.float64, requires_grad=True)
    score = torch.rand(T, K, generator=g, dtype=torch.float64).add(0.5).requires_grad_(True)
    buf = torch.randn(T * K, 3, generator=g, dtype=torch.float64, requires_grad=True)
    with ops.use_backend(backend):
        counts = ops.expert_count(idx, E)
        pos, inv = ops.assign_pos(idx, counts)
        assert torch.autograd.gradcheck(lambda x: ops.scatter_rows(x, pos, inv, K), (x,))
        assert torch.autograd.gradcheck(lambda b, s: ops.gather_rows(b, pos, inv, K, s), (buf, score))
        assert torch.autograd.gradcheck(lambda b: ops.gather_rows(b, pos, inv, K), (buf,))
        # The whole dispatch round trip: scatter, a per-row scale, gather with the scores.
        scale = torch.linspace(0.5, 1.5, T * K, dtype=torch.float64).unsqueeze(1)
        assert torch.autograd.gradcheck(
            lambda x, s: ops.gather_rows(ops.scatter_rows(x, pos, inv, K) * scale, pos, inv, K, s),
            (x, score))


def test_float64_is_native():
    """The native kernels dispatch on floating types: float64 must not fall back."""
    x = torch.randn(4, 3, dtype=torch.float64)
    pos = torch.tensor([0, 2, -1, 1])
    assert native.scatter_rows(x, pos, 1).dtype == torch.float64
    w = torch.randn(2, 5, 3, dtype=torch.float64)
    assert native.grouped_mm(x, w, torch.tensor([1, 3])).dtype == torch.float64


# ---------------------------------------------------------------------------- errors

IDX = torch.tensor([[0, 1], [3, 2], [1, 1]])
NATIVE_ERRORS = [
    ("idx_int32", lambda: ops.expert_count(IDX.int(), 4), "int64"),
    ("assign_pos_int32_counts", lambda: ops.assign_pos(IDX, torch.tensor([1, 3, 1, 1], dtype=torch.int32)), "int64"),
    ("gemm_negative_count", lambda: ops.grouped_linear(torch.randn(4, 3), torch.randn(2, 5, 3),
                                                      torch.tensor([-1, 2])), "negative"),
    # Counts whose int64 sum wraps around to 4: rejected at the first count past the rows.
    ("gemm_counts_wrap_around", lambda: ops.grouped_linear(torch.randn(4, 3), torch.randn(4, 5, 3),
                                                          torch.tensor([2**62] * 3 + [2**62 + 4])), "rows"),
    ("assign_pos_counts_wrap_around", lambda: ops.assign_pos(IDX, torch.tensor([2**62] * 3 + [2**62 + 6])),
     "rows"),
    ("scatter_pos_out_of_range", lambda: ops.scatter_rows(torch.randn(3, 4), torch.tensor([0, 1, 7, -1, 2, 3]),
                                                         torch.tensor([0, 1, 4, 5, -1, -1]), 2), "out of range"),
    ("scatter_int_x", lambda: ops.scatter_rows(torch.ones(3, 4, dtype=torch.int64), torch.tensor([0, 1, 2, 3, 4, 5]),
                                              torch.tensor([0, 1, 2, 3, 4, 5]), 2), "Long"),
]
BOTH_ERRORS = [
    ("idx_float", lambda: ops.expert_count(IDX.float(), 4), None),
    ("expert_count_out_of_range", lambda: ops.expert_count(IDX, 3), "out of range"),
    ("gemm_dtype_mismatch", lambda: ops.grouped_linear(torch.randn(4, 3), torch.randn(2, 5, 3, dtype=torch.float64),
                                                      torch.tensor([2, 2])), None),
    ("gemm_counts_exceed_rows", lambda: ops.grouped_linear(torch.randn(4, 3), torch.randn(2, 5, 3),
                                                          torch.tensor([2, 3])), None),
    ("gemm_features", lambda: ops.grouped_linear(torch.randn(4, 3), torch.randn(2, 5, 4),
                                                torch.tensor([2, 2])), None),
    ("gather_rows_buffer_size", lambda: ops.gather_rows(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4, 5]),
                                                       torch.tensor([0, 1, 2, 3, 4, 5]), 2), "rows"),
    ("assign_pos_counts_too_large", lambda: ops.assign_pos(IDX, torch.tensor([1, 3, 2, 1])), "counts"),
    # Positions made for top_k=2 (10 slots of 5 tokens) used with top_k=3 read other tokens' rows.
    ("scatter_rows_top_k", lambda: ops.scatter_rows(torch.randn(5, 4), torch.arange(10), torch.arange(10), 3),
     "top_k=3, but the positions (inv) are for 10 slots"),
    ("prune_expert_out_of_range", lambda: ops.prune_gate_by_capacity(IDX, torch.tensor([1, 1, 1])), "out of range"),
    ("limit_shape", lambda: ops.limit_by_capacity(torch.tensor([1, 2, 3]), torch.tensor([1, 1]), 2, 2), None),
]
# Routing plans inconsistent with idx (or with the weights): both back ends reject them, each in its
# own words (the matches are the native kernels').
FALLBACK_UNCHECKED = [
    ("assign_pos_counts_too_small", lambda: ops.assign_pos(IDX, torch.tensor([1, 2, 1, 0])), "smaller"),
    ("assign_pos_expert_out_of_range", lambda: ops.assign_pos(IDX, torch.tensor([1, 3, 1])), "out of range"),
    ("gemm_counts_vs_experts", lambda: ops.grouped_linear(torch.randn(4, 3), torch.randn(2, 5, 3),
                                                         torch.tensor([2, 2, 0])), "experts"),
]


def _expect_error(fn, match):
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)) as info:
        fn()
    msg = str(info.value)
    assert len(msg) > 10, f"unhelpful error message: {msg!r}"
    if match is not None:
        assert match.lower() in msg.lower(), msg


@pytest.mark.parametrize("name,fn,match", NATIVE_ERRORS + BOTH_ERRORS + FALLBACK_UNCHECKED,
                         ids=[c[0] for c in NATIVE_ERRORS + BOTH_ERRORS + FALLBACK_UNCHECKED])
def test_native_rejects_bad_input(name, fn, match):
    with ops.use_backend("native"):
        _expect_error(fn, match)


@pytest.mark.parametrize("name,fn,match", BOTH_ERRORS, ids=[c[0] for c in BOTH_ERRORS])
def test_fallback_rejects_bad_input(name, fn, match):
    with ops.use_backend("torch"):
        _expect_error(fn, None)


@pytest.mark.parametrize("name,fn,match", FALLBACK_UNCHECKED, ids=[c[0] for c in FALLBACK_UNCHECKED])
def test_fallback_rejects_inconsistent_plan(name, fn, match):
    with ops.use_backend("torch"):
        _expect_error(fn, None)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_arguments_checked_alike(impl):
    """What the fallback used to take silently and the native kernels refused (or read
    differently): weights of the wrong size, float capacities, a bias of another dtype, no
    experts at all; and any negative expert id marks a dropped slot in both."""
    x, buf = torch.randn(3, 4), torch.randn(6, 4)
    pos = inv = torch.tensor([0, 1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError, match="T\\*top_k"):
        impl.gather_rows(buf, inv, 2, torch.ones(1))
    with pytest.raises(RuntimeError, match="T\\*top_k"):
        impl.scatter_rows(x, pos, 2, torch.ones(7))
    with pytest.raises(RuntimeError, match="keep must have an integer dtype"):
        impl.prune_gate_by_capacity(IDX, torch.tensor([1.5, 0.5, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match="capacity must have an integer dtype"):
        impl.limit_by_capacity(torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 2.0]), 2, 2)
    # int32 limits are read as they are (first choices of every token before second ones).
    assert impl.prune_gate_by_capacity(IDX, torch.tensor([1, 1, 1, 1], dtype=torch.int32)).tolist() == \
        [[0, -1], [3, 2], [1, -1]]
    dropped = torch.full((3, 2), -1, dtype=torch.int64)
    assert torch.equal(impl.prune_gate_by_capacity(dropped, torch.zeros(0, dtype=torch.int64)), dropped)
    y = impl.grouped_mm(x, torch.randn(2, 5, 4), torch.tensor([1, 2]),
                        torch.randn(2, 5, dtype=torch.float64))
    assert y.dtype == torch.float32
    idx = torch.tensor([[0, -2], [-1, 1]])
    assert impl.expert_count(idx, 2).tolist() == [1, 1]
    assert impl.prune_gate_by_capacity(idx, torch.tensor([5, 5])).tolist() == [[0, -1], [-1, 1]]


def test_use_backend_validates_its_argument():
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("cuda"):
            pass
    assert ops.backend_name("cpu") == "native"
    with ops.use_backend("torch"):
        assert ops.backend_name("cpu") == "torch"
        assert ops.kernels_for(torch.empty(0)) is reference
    with ops.use_backend("native"):
        assert ops.kernels_for(torch.empty(0)) is native
