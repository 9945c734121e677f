"""The fused expert MLP (``expert_mlp``, contract in csrc/fmoe_ops.h): the native CPU kernel and
the pure-PyTorch fallback against a brute-force loop over rows written here from the contract, with
the derivatives of the activations written out by hand; every output and gradient in fp32 and bf16;
a cut between threads inside an expert; gradcheck in float64; the errors; and the layer, whose
fused experts must compute what the three separate ops compute, with less kept for backward.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastmoe_megatron import ops
from fastmoe_megatron.gates import NaiveGate
from fastmoe_megatron.layers import FMoETransformerMLP
from fastmoe_megatron.ops import native, reference

IMPLS = [pytest.param(native, id="native"), pytest.param(reference, id="torch")]
ACTS = ["gelu", "gelu_tanh", "relu", "silu"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
CASES = [([3, 0, 2, 4], 0), ([0, 0], 2), ([5], 1), ([1] * 12, 3), ([0, 6, 0], 0)]


@pytest.fixture(scope="module", autouse=True)
def _native_loaded():
    assert native.available(), "the native CPU ops did not build or load"


# ---------------------------------------------------------------------------- brute force

def act64(name, h):
    if name == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    if name == "relu":
        return h.clamp_min(0)
    return h * torch.sigmoid(h)


def dact64(name, h):
    """The derivative of the activation, by hand."""
    if name == "gelu":
        return 0.5 * (1 + torch.erf(h / math.sqrt(2))) + h * torch.exp(-h * h / 2) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (h + 0.044715 * h ** 3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * 0.044715 * h * h)
    if name == "relu":
        return (h > 0).double()
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


def bf_forward(x, counts, w1, b1, w2, b2, act):
    """Row by row in float64: (y, hidden)."""
    N, D = x.shape
    H = w1.shape[1]
    y = torch.zeros(N, D, dtype=torch.float64)
    hidden = torch.zeros(N, H, dtype=torch.float64)
    r = 0
    for e, n in enumerate(counts):
        for _ in range(n):
            h = w1[e].double() @ x[r].double() + (b1[e].double() if b1 is not None else 0)
            hidden[r] = h
            y[r] = w2[e].double() @ act64(act, h) + (b2[e].double() if b2 is not None else 0)
            r += 1
    return y, hidden


def bf_backward(gy, x, hidden, counts, w1, w2, act):
    """Row by row in float64 from the chain rule: (gx, gw1, gb1, gw2, gb2)."""
    E, H, D = w1.shape
    gx = torch.zeros(x.shape, dtype=torch.float64)
    gw1, gb1 = torch.zeros(E, H, D, dtype=torch.float64), torch.zeros(E, H, dtype=torch.float64)
    gw2, gb2 = torch.zeros(E, D, H, dtype=torch.float64), torch.zeros(E, D, dtype=torch.float64)
    r = 0
    for e, n in enumerate(counts):
        for _ in range(n):
            g, h, xr = gy[r].double(), hidden[r].double(), x[r].double()
            gw2[e] += torch.outer(g, act64(act, h))
            gb2[e] += g
            dh = (w2[e].double().t() @ g) * dact64(act, h)
            gw1[e] += torch.outer(dh, xr)
            gb1[e] += dh
            gx[r] = w1[e].double().t() @ dh
            r += 1
    return gx, gw1, gb1, gw2, gb2


def make(counts, pad, D, H, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts) + pad
    x = torch.randn(N, D, generator=g).to(dtype)
    w1 = (torch.randn(E, H, D, generator=g) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, D, H, generator=g) / math.sqrt(H)).to(dtype)
    b1 = torch.randn(E, H, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, D, generator=g).to(dtype) if bias else None
    gy = torch.randn(N, D, generator=g).to(dtype)
    return x, torch.tensor(counts, dtype=torch.int64), w1, b1, w2, b2, gy


def close(name, got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol,
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("counts,pad", CASES)
def test_expert_mlp_kernels(impl, counts, pad, bias, act, dtype):
    x, c, w1, b1, w2, b2, gy = make(counts, pad, 6, 5, dtype, bias, seed=len(counts) + pad)
    y, hidden = impl.expert_mlp(x, c, w1, b1, w2, b2, act)
    assert y.shape == (x.shape[0], 6) and hidden.shape == (x.shape[0], 5)
    assert y.dtype == dtype and hidden.dtype == dtype
    want_y, want_h = bf_forward(x, counts, w1, b1, w2, b2, act)
    close("hidden", hidden, want_h, dtype)
    close("y", y, want_y, dtype)
    total = sum(counts)
    assert torch.count_nonzero(y[total:]) == 0 and torch.count_nonzero(hidden[total:]) == 0

    # The backward pass from the kernel's own hidden (checked above): a ReLU's kink then cannot
    # flip between the kernel and the reference in bf16.
    grads = impl.expert_mlp_backward(gy, x, hidden, c, w1, w2, act, [True] * 5)
    wants = bf_backward(gy, x, hidden, counts, w1, w2, act)
    for name, got, want in zip(("gx", "gw1", "gb1", "gw2", "gb2"), grads, wants):
        assert got.dtype == dtype
        close(name, got, want, dtype)
    assert torch.count_nonzero(grads[0][total:]) == 0

    # One output at a time: the others come back empty.
    for i in range(5):
        mask = [j == i for j in range(5)]
        outs = impl.expert_mlp_backward(gy, x, hidden, c, w1, w2, act, mask)
        for j, out in enumerate(outs):
            if j == i:
                torch.testing.assert_close(out, grads[j], rtol=0, atol=0)
            else:
                assert out.numel() == 0

    # Weight gradients written into given buffers (their old contents overwritten).
    out1, out2 = torch.full_like(w1, 7.0), torch.full_like(w2, 7.0)
    outs = impl.expert_mlp_backward(gy, x, hidden, c, w1, w2, act, [True] * 5, out1, out2)
    assert outs[1].numel() == 0 and outs[3].numel() == 0
    torch.testing.assert_close(out1, grads[1], rtol=0, atol=0)
    torch.testing.assert_close(out2, grads[3], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [[300, 10, 290, 0, 401], [1000], [0, 0, 999, 1]],
                         ids=["straddle", "one_expert", "late"])
def test_expert_mlp_native_split_between_threads(counts, dtype):
    """Big enough for the native kernel to cut the rows between 2 threads inside an expert: that
    expert's parameter gradients are summed from both shares."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, c, w1, b1, w2, b2, gy = make(counts, 7, 64, 96, dtype, True, seed=3)
        y, hidden = native.expert_mlp(x, c, w1, b1, w2, b2, "gelu")
        grads = native.expert_mlp_backward(gy, x, hidden, c, w1, w2, "gelu", [True] * 5)
    finally:
        torch.set_num_threads(old)
    # Reference: the same formulas per expert block in float64.
    want_y, want_h = bf_forward(x, counts, w1, b1, w2, b2, "gelu")
    close("hidden", hidden, want_h, dtype)
    close("y", y, want_y, dtype)
    E = len(counts)
    gx = torch.zeros(x.shape, dtype=torch.float64)
    gw1, gb1 = torch.zeros(w1.shape, dtype=torch.float64), torch.zeros(E, 96, dtype=torch.float64)
    gw2, gb2 = torch.zeros(w2.shape, dtype=torch.float64), torch.zeros(E, 64, dtype=torch.float64)
    r = 0
    for e, n in enumerate(counts):
        g, h, xe = gy[r:r + n].double(), hidden[r:r + n].double(), x[r:r + n].double()
        gw2[e], gb2[e] = g.t() @ act64("gelu", h), g.sum(0)
        dh = (g @ w2[e].double()) * dact64("gelu", h)
        gw1[e], gb1[e], gx[r:r + n] = dh.t() @ xe, dh.sum(0), dh @ w1[e].double()
        r += n
    for name, got, want in zip(("gx", "gw1", "gb1", "gw2", "gb2"), grads, (gx, gw1, gb1, gw2, gb2)):
        close(name, got, want, dtype)


CHUNKS = [  # the same experts' rows in two buffers (as from two expert-parallel sources)
    pytest.param([3, 0, 2, 4], [1, 5, 0, 2], id="mixed"),
    pytest.param([0, 0, 0], [2, 3, 1], id="first_empty"),
    pytest.param([4, 1], [0, 0], id="second_empty"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("first,second", CHUNKS)
def test_expert_mlp_backward_accumulates(impl, first, second, bias, dtype):
    """Chunk by chunk into given buffers, written by the first call and added to by the second,
    the parameter gradients are those of all the rows at once (brute force)."""
    E, D, H = len(first), 6, 5
    x1, c1, w1, b1, w2, b2, gy1 = make(first, 1, D, H, dtype, bias, seed=11)
    x2, c2, *_, gy2 = make(second, 0, D, H, dtype, bias, seed=12)
    h1 = impl.expert_mlp(x1, c1, w1, b1, w2, b2, "gelu")[1]
    h2 = impl.expert_mlp(x2, c2, w1, b1, w2, b2, "gelu")[1]
    outs = [torch.full_like(w1, 7.0), torch.full_like(w2, 7.0),
            torch.full((E, H), 7.0, dtype=dtype), torch.full((E, D), 7.0, dtype=dtype)]
    mask = [True, True, bias, True, bias]
    g1 = impl.expert_mlp_backward(gy1, x1, h1, c1, w1, w2, "gelu", mask, *outs, False)
    g2 = impl.expert_mlp_backward(gy2, x2, h2, c2, w1, w2, "gelu", mask, *outs, True)
    for g in (g1, g2):
        assert [t.numel() for t in g[1:]] == [0, 0, 0, 0]  # all into the buffers
    # Brute force: each chunk's rows on their own, the parameter gradients summed over both.
    want1 = bf_backward(gy1, x1, h1, first, w1, w2, "gelu")
    want2 = bf_backward(gy2, x2, h2, second, w1, w2, "gelu")
    close("gx first", g1[0], want1[0], dtype)
    close("gx second", g2[0], want2[0], dtype)
    got = dict(gw1=outs[0], gw2=outs[1], gb1=outs[2], gb2=outs[3])
    for i, name in ((1, "gw1"), (2, "gb1"), (3, "gw2"), (4, "gb2")):
        if mask[i]:
            close(name, got[name], want1[i] + want2[i], dtype)
        else:  # not asked for: the buffer is left alone
            assert bool((got[name] == 7.0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_mlp_native_accumulates_between_threads(dtype):
    """Accumulating where the rows of one expert are cut between 2 threads: the share that holds
    the expert's first row adds into the buffer, the other one's partial is added after."""
    counts = [300, 10, 290, 0, 401]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, c, w1, b1, w2, b2, gy = make(counts, 3, 64, 96, dtype, True, seed=4)
        hidden = native.expert_mlp(x, c, w1, b1, w2, b2, "silu")[1]
        start = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).to(dtype)
                 for i, t in enumerate((w1, w2, b1, b2))]
        outs = [t.clone() for t in start]
        native.expert_mlp_backward(gy, x, hidden, c, w1, w2, "silu", [True] * 5, *outs, True)
    finally:
        torch.set_num_threads(old)
    want = bf_backward(gy, x, hidden, counts, w1, w2, "silu")
    for name, got, s, w in zip(("gw1", "gw2", "gb1", "gb2"), outs, start,
                               (want[1], want[3], want[2], want[4])):
        close(name, got, s.double() + w, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_mlp_backward_accumulate_needs_buffers(impl):
    x, c, w1, b1, w2, b2, gy = make([2, 2], 0, 3, 4, torch.float32, True)
    hidden = impl.expert_mlp(x, c, w1, b1, w2, b2, "gelu")[1]
    outs = [torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(b1), None]
    with pytest.raises(RuntimeError, match="accumulate=True .* grad_b2_out is missing"):
        impl.expert_mlp_backward(gy, x, hidden, c, w1, w2, "gelu", [True] * 5, *outs, True)
    with pytest.raises(RuntimeError, match="grad_b1_out"):
        impl.expert_mlp_backward(gy, x, hidden, c, w1, w2, "gelu", [True] * 5, outs[0], outs[1],
                                 torch.zeros(2, 5), None, False)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_expert_mlp_gradcheck(backend, act, bias):
    x, c, w1, b1, w2, b2, _ = make([2, 0, 3], 1, 3, 4, torch.float64, bias, seed=5)
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2) if t is not None]

    def fn(*t):
        if bias:
            return ops.expert_mlp(t[0], c, t[1], t[2], t[3], t[4], act)
        return ops.expert_mlp(t[0], c, t[1], None, t[2], None, act)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_mlp_errors(impl):
    x, c, w1, b1, w2, b2, gy = make([2, 2], 0, 3, 4, torch.float32, True)
    with pytest.raises(RuntimeError, match="gelu, gelu_tanh, relu, silu"):
        impl.expert_mlp(x, c, w1, b1, w2, b2, "tanh")
    with pytest.raises(RuntimeError, match="fc2"):
        impl.expert_mlp(x, c, w1, b1, w2.transpose(1, 2), b2, "gelu")
    with pytest.raises(RuntimeError, match="gelu, gelu_tanh, relu, silu"):
        impl.expert_mlp_backward(gy, x, torch.zeros(4, 4), c, w1, w2, "swish", [True] * 5)


def test_expert_mlp_native_errors():
    x, c, w1, b1, w2, b2, gy = make([2, 2], 0, 3, 4, torch.float32, True)
    for bad, match in ((lambda: native.expert_mlp(x, torch.tensor([2, 1, 1]), w1, b1, w2, b2, "gelu"), "experts"),
                       (lambda: native.expert_mlp(x, torch.tensor([3, 2]), w1, b1, w2, b2, "gelu"), None),
                       (lambda: native.expert_mlp(x, c, w1, b1[:1], w2, b2, "gelu"), "fc1 bias"),
                       (lambda: native.expert_mlp(x.double(), c, w1, b1, w2, b2, "gelu"), "dtype"),
                       (lambda: native.expert_mlp_backward(gy, x, torch.zeros(4, 5), c, w1, w2, "gelu",
                                                           [True] * 5), "hidden"),
                       (lambda: native.expert_mlp_backward(gy, x, torch.zeros(4, 4), c, w1, w2, "gelu",
                                                           [True] * 5, torch.zeros(2, 4, 4)),
                        "grad_w1_out")):
        with pytest.raises(RuntimeError) as info:
            bad()
        if match is not None:
            assert match in str(info.value)


# ---------------------------------------------------------------------------- the layer

def test_activation_name():
    assert ops.activation_name(torch.nn.GELU()) == "gelu"
    assert ops.activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert ops.activation_name(F.gelu) == "gelu"
    assert ops.activation_name(torch.nn.ReLU()) == "relu"
    assert ops.activation_name(torch.relu) == "relu"
    assert ops.activation_name(F.relu) == "relu"
    assert ops.activation_name(torch.nn.SiLU()) == "silu"
    assert ops.activation_name(F.silu) == "silu"
    assert ops.activation_name(torch.tanh) is None
    assert ops.activation_name(lambda t: F.gelu(t)) is None

    class MyGELU(torch.nn.GELU):  # may compute something else: not fused
        pass

    assert ops.activation_name(MyGELU()) is None


def _saved_bytes(model, x):
    """Bytes of the tensors that autograd keeps for the backward pass of ``model(x)``, other than
    the model's parameters (kept anyway)."""
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return y, sum(seen.values())


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("act", [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.ReLU(),
                                 torch.nn.SiLU()], ids=ACTS)
def test_layer_fused_matches_separate_ops(backend, act):
    """The layer with a known activation (one fused op) against the same layer with the activation
    hidden in a lambda (grouped GEMM, activation, grouped GEMM): same output and gradients, over
    two steps (the second reuses the weight-gradient buffers); less memory kept for backward."""
    torch.manual_seed(0)
    fused = FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=2, gate=NaiveGate,
                               activation=act)
    separate = FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=2, gate=NaiveGate,
                                  activation=lambda t: act(t))
    separate.load_state_dict(fused.state_dict())
    x = torch.randn(37, 16)
    gy = torch.randn(37, 16)
    with ops.use_backend(backend):
        for _ in range(2):
            outs, kept = [], []
            for model in (fused, separate):
                model.zero_grad(set_to_none=True)
                xx = x.clone().requires_grad_(True)
                y, nbytes = _saved_bytes(model, xx)
                y.backward(gy)
                outs.append([y, xx.grad] + [p.grad for p in model.parameters()])
                kept.append(nbytes)
            for got, want in zip(*outs):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # The separate ops keep the activation's input and output, [37 * 2, 24] floats each,
            # the fused op only its input. (ReLU's backward needs only its output, which the
            # separate ops keep once for both.)
            if isinstance(act, torch.nn.ReLU):
                assert kept[0] <= kept[1], kept
            else:
                assert kept[1] - kept[0] >= 37 * 2 * 24 * 4, kept


def test_fused_experts_switch(monkeypatch):
    """FMOE_FUSED_EXPERTS=0 runs the three ops (the activation's output is then kept for
    backward); a bad value is an error naming the variable."""
    torch.manual_seed(0)
    model = FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=2, gate=NaiveGate)
    x = torch.randn(37, 16, requires_grad=True)
    y_fused, kept_fused = _saved_bytes(model, x)
    monkeypatch.setenv("FMOE_FUSED_EXPERTS", "0")
    y_separate, kept_separate = _saved_bytes(model, x)
    torch.testing.assert_close(y_fused, y_separate, rtol=1e-5, atol=1e-6)
    assert kept_separate - kept_fused >= 37 * 2 * 24 * 4
    monkeypatch.setenv("FMOE_FUSED_EXPERTS", "yes")
    with pytest.raises(ValueError, match="FMOE_FUSED_EXPERTS.*0, 1"):
        model(x)
