"""The seeds' worked examples (003, 004, 001) as tests with hand-checkable numbers.

Also checks the seeds' backward-input recipe -- pad dL/dZ by k-1 (dilated by
the stride), rotate the kernel by 180 degrees, swap in/out channels, correlate
-- written here independently with plain loops, against ``Conv2D.backward``
and ``gpucnn.functional.im2col.conv2d_backward_input_seed`` on random shapes.
"""
from __future__ import annotations

import numpy as np
import pytest
pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import given  # noqa: E402

from gpucnn import layers as L  # noqa: E402
from gpucnn import losses  # noqa: E402
from gpucnn.functional.im2col import conv2d_backward_input_seed  # noqa: E402
from strategies import conv_configs, hyp  # noqa: E402

# Conv outputs are sums of products: compare with tolerances, never exactly.
RTOL, ATOL = 1e-12, 1e-12


def conv_with_kernel(K, stride=1, padding=0, bias=0.0):
    """A 1-in / 1-out float64 Conv2D whose single kernel is ``K``."""
    K = np.asarray(K, dtype=np.float64)
    conv = L.Conv2D(1, 1, K.shape, stride=stride, padding=padding, dtype=np.float64)
    conv.params["W"][...] = K
    conv.params["b"][...] = bias
    return conv


# --------------------------------------------------------------------------- #
# seeds 003 / 004: 3x3 input X, 2x2 kernel K, stride 1 -> 2x2 output Z
# --------------------------------------------------------------------------- #

X = np.array([[1, 2, 3],
              [4, 5, 6],
              [7, 8, 9]], dtype=np.float64)
K = np.array([[1, 2],
              [3, 4]], dtype=np.float64)
DZ = np.array([[1, 0],
               [0, 2]], dtype=np.float64)


def run_seed_example():
    conv = conv_with_kernel(K)
    Z = conv.forward(X[None, None].copy())
    dX = conv.backward(DZ[None, None].copy())
    return conv, Z[0, 0], dX[0, 0]


def test_seed004_forward_elements():
    # O11 = X11 F11 + X12 F12 + X21 F21 + X22 F22 = 1*1 + 2*2 + 4*3 + 5*4 = 37
    # O12 = 2*1 + 3*2 + 5*3 + 6*4 = 47
    # O21 = 4*1 + 5*2 + 7*3 + 8*4 = 67
    # O22 = 5*1 + 6*2 + 8*3 + 9*4 = 77
    _, Z, _ = run_seed_example()
    np.testing.assert_allclose(Z, [[37, 47], [67, 77]], rtol=RTOL, atol=ATOL)


def test_seed003_kernel_gradient_is_conv_of_x_with_dz():
    # dL/dK = conv(X, dL/dZ) (valid), element by element (seed 004):
    # dK11 = X11 dZ11 + X12 dZ12 + X21 dZ21 + X22 dZ22 = 1*1 + 2*0 + 4*0 + 5*2 = 11
    # dK12 = X12 dZ11 + X13 dZ12 + X22 dZ21 + X23 dZ22 = 2*1 + 3*0 + 5*0 + 6*2 = 14
    # dK21 = X21 dZ11 + X22 dZ12 + X31 dZ21 + X32 dZ22 = 4*1 + 5*0 + 7*0 + 8*2 = 20
    # dK22 = X22 dZ11 + X23 dZ12 + X32 dZ21 + X33 dZ22 = 5*1 + 6*0 + 8*0 + 9*2 = 23
    conv, _, _ = run_seed_example()
    np.testing.assert_allclose(conv.grads["W"][0, 0], [[11, 14], [20, 23]], rtol=RTOL, atol=ATOL)
    # dL/db = sum dL/dZ = 1 + 0 + 0 + 2 = 3
    np.testing.assert_allclose(conv.grads["b"], [3.0], rtol=RTOL, atol=ATOL)


def test_seed003_input_gradient_is_full_conv_with_rotated_kernel():
    # dL/dX = conv(padded(dL/dZ), rot180(K)):
    #   padded dZ = [[0,0,0,0],      rot180(K) = [[4,3],
    #                [0,1,0,0],                   [2,1]]
    #                [0,0,2,0],
    #                [0,0,0,0]]
    # dX11 = dZ11 K11                               = 1
    # dX12 = dZ11 K12 + dZ12 K11                    = 2 + 0      = 2
    # dX13 = dZ12 K12                               = 0
    # dX21 = dZ11 K21 + dZ21 K11                    = 3 + 0      = 3
    # dX22 = dZ11 K22 + dZ12 K21 + dZ21 K12 + dZ22 K11 = 4 + 0 + 0 + 2 = 6
    # dX23 = dZ12 K22 + dZ22 K12                    = 0 + 4      = 4
    # dX31 = dZ21 K21                               = 0
    # dX32 = dZ21 K22 + dZ22 K21                    = 0 + 6      = 6
    # dX33 = dZ22 K22                               = 8
    _, _, dX = run_seed_example()
    np.testing.assert_allclose(dX, [[1, 2, 0],
                                    [3, 6, 4],
                                    [0, 6, 8]], rtol=RTOL, atol=ATOL)


def test_seed003_input_gradient_via_public_seed_function():
    dX = conv2d_backward_input_seed(DZ[None, None].copy(), K[None, None].copy(), (3, 3), (1, 1), (0, 0))
    np.testing.assert_allclose(dX[0, 0], [[1, 2, 0], [3, 6, 4], [0, 6, 8]], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- #
# seed 003: pooling backward
# --------------------------------------------------------------------------- #

C_POOL = np.array([[[[1.0, 2.0],
                     [3.0, 4.0]]]])


def test_seed003_maxpool_backward_goes_to_the_max_only():
    # C = [[1,2],[3,4]] -> P = max = 4 (the seed's OCR garbles P); dL/dP = 2
    # -> dL/dC = [[0,0],[0,2]]: only the max element gets the gradient.
    pool = L.MaxPool2D(2)
    P = pool.forward(C_POOL.copy())
    np.testing.assert_array_equal(P, [[[[4.0]]]])
    dC = pool.backward(np.full((1, 1, 1, 1), 2.0))
    np.testing.assert_array_equal(dC, [[[[0.0, 0.0], [0.0, 2.0]]]])


def test_seed003_meanpool_backward_spreads_a_quarter():
    # C = [[1,2],[3,4]] -> P = (1+2+3+4)/4 = 2.5; dL/dP = 2 -> dL/dC = 2/4 = 0.5 each
    pool = L.AvgPool2D(2)
    P = pool.forward(C_POOL.copy())
    np.testing.assert_allclose(P, [[[[2.5]]]], rtol=RTOL)
    dC = pool.backward(np.full((1, 1, 1, 1), 2.0))
    np.testing.assert_allclose(dC, [[[[0.5, 0.5], [0.5, 0.5]]]], rtol=RTOL)


def test_seed000_meanpool_upsamples_each_error_by_a_quarter():
    # seed 000: a 4x4 map pooled 2x2 -> 2x2; dL/dP = [[1,2],[3,4]] is upsampled
    # as a Kronecker product with ones(2,2)/4.
    pool = L.AvgPool2D(2)
    pool.forward(np.zeros((1, 1, 4, 4)))
    dP = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = [[0.25, 0.25, 0.50, 0.50],
                [0.25, 0.25, 0.50, 0.50],
                [0.75, 0.75, 1.00, 1.00],
                [0.75, 0.75, 1.00, 1.00]]
    np.testing.assert_allclose(pool.backward(dP)[0, 0], expected, rtol=RTOL)


# --------------------------------------------------------------------------- #
# seed 003 / 001: softmax + cross-entropy gradient p - y
# --------------------------------------------------------------------------- #


def test_seed003_softmax_cross_entropy_gradient_is_p_minus_y():
    # logits = log([1, 2, 5]) -> e^z = [1, 2, 5], sum 8 -> p = [0.125, 0.25, 0.625]
    # label 1 -> onehot y = [0, 1, 0]; L = -log(0.25) = log 4 = 1.3862943611198906
    # dL/dz = p - y = [0.125, -0.75, 0.625]  (batch of one: no 1/N factor)
    ce = losses.SoftmaxCrossEntropy()
    logits = np.log(np.array([[1.0, 2.0, 5.0]]))
    loss = ce.forward(logits, np.array([1]))
    np.testing.assert_allclose(float(loss), 1.3862943611198906, rtol=1e-14)
    np.testing.assert_allclose(ce.probs, [[0.125, 0.25, 0.625]], rtol=1e-14)
    np.testing.assert_allclose(ce.backward(), [[0.125, -0.75, 0.625]], rtol=1e-14, atol=1e-15)


def test_seed001_cross_entropy_gradient_is_batch_averaged():
    # two rows of the example above with labels 1 and 2: each row's p - y, halved
    # row 0: ([0.125, 0.25, 0.625] - [0, 1, 0]) / 2 = [0.0625, -0.375, 0.3125]
    # row 1: ([0.125, 0.25, 0.625] - [0, 0, 1]) / 2 = [0.0625,  0.125, -0.1875]
    # L = (log 4 + log 1.6) / 2 = log(6.4) / 2
    ce = losses.SoftmaxCrossEntropy()
    logits = np.log(np.array([[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]]))
    loss = ce.forward(logits, np.array([1, 2]))
    np.testing.assert_allclose(float(loss), np.log(6.4) / 2, rtol=1e-14)
    np.testing.assert_allclose(ce.backward(), [[0.0625, -0.375, 0.3125], [0.0625, 0.125, -0.1875]],
                               rtol=1e-14, atol=1e-15)


def test_seed_euclidean_loss_gradient():
    # L = (1/N) sum 1/2 ||a - y||^2 with N = 2: a - y = [[1, -2], [0, 3]]
    # L = (1/2)(1/2)(1 + 4 + 0 + 9) = 3.5;  dL/da = (a - y) / 2
    mse = losses.MSE()
    a = np.array([[1.0, 0.0], [2.0, 3.0]])
    y = np.array([[0.0, 2.0], [2.0, 0.0]])
    np.testing.assert_allclose(float(mse.forward(a, y)), 3.5, rtol=1e-15)
    np.testing.assert_allclose(mse.backward(), [[0.5, -1.0], [0.0, 1.5]], rtol=1e-15)


def test_seed001_relu_subgradient_is_half_at_zero():
    # seed 001 eq. 10 takes dReLU/dz = 1/2 at z = 0
    relu = L.ReLU()
    relu.forward(np.array([[-1.0, 0.0, 2.0]]))
    np.testing.assert_array_equal(relu.backward(np.array([[4.0, 4.0, 4.0]])), [[0.0, 2.0, 4.0]])


def test_seed002_scaled_tanh_values():
    # f(z) = 1.7159 tanh(0.6666 z): f(0) = 0, f(1) = 1.7159 tanh(0.6666),
    # f'(0) = 1.7159 * 0.6666 = 1.14381894
    st = L.ScaledTanh()
    y = st.forward(np.array([[0.0, 1.0]]))
    np.testing.assert_allclose(y, [[0.0, 1.7159 * np.tanh(0.6666)]], rtol=1e-15)
    st.forward(np.array([[0.0]]))
    np.testing.assert_allclose(st.backward(np.array([[1.0]])), [[1.14381894]], rtol=1e-14)


# --------------------------------------------------------------------------- #
# the seeds' backward-input formula, written independently with loops
# --------------------------------------------------------------------------- #


def seed_backward_input_loops(dy, W, x_hw, stride, padding):
    """dL/dx by the seeds' recipe, step by step, with explicit loops.

    1. dilate dy by the stride (stride-1 zeros between entries);
    2. pad it by k-1 on every side (the "full" convolution), plus the
       remainder rows/cols (H + 2p - k) % s at the bottom/right that no window
       reached;
    3. rotate W by 180 degrees and swap in/out channels: Wr[c, o] = rot180(W[o, c]);
    4. valid-correlate: dxp[n, c, a, b] = sum_{o,u,v} full[n, o, a+u, b+v] Wr[c, o, u, v];
    5. crop the forward padding.
    """
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = W.shape
    (H, Wd), (sh, sw), (ph, pw) = x_hw, stride, padding
    Hp, Wp = H + 2 * ph, Wd + 2 * pw
    rh, rw = (Hp - kh) - (Ho - 1) * sh, (Wp - kw) - (Wo - 1) * sw  # uncovered remainder
    assert 0 <= rh < sh and 0 <= rw < sw

    dil = np.zeros((N, O, (Ho - 1) * sh + 1, (Wo - 1) * sw + 1))
    for i in range(Ho):
        for j in range(Wo):
            dil[:, :, i * sh, j * sw] = dy[:, :, i, j]

    full = np.zeros((N, O, dil.shape[2] + 2 * (kh - 1) + rh, dil.shape[3] + 2 * (kw - 1) + rw))
    full[:, :, kh - 1 : kh - 1 + dil.shape[2], kw - 1 : kw - 1 + dil.shape[3]] = dil
    assert full.shape[2:] == (Hp + kh - 1, Wp + kw - 1)

    Wr = np.zeros((C, O, kh, kw))
    for o in range(O):
        for c in range(C):
            for u in range(kh):
                for v in range(kw):
                    Wr[c, o, u, v] = W[o, c, kh - 1 - u, kw - 1 - v]

    dxp = np.zeros((N, C, Hp, Wp))
    for n in range(N):
        for c in range(C):
            for a in range(Hp):
                for b in range(Wp):
                    s = 0.0
                    for o in range(O):
                        for u in range(kh):
                            for v in range(kw):
                                s += full[n, o, a + u, b + v] * Wr[c, o, u, v]
                    dxp[n, c, a, b] = s
    return dxp[:, :, ph : ph + H, pw : pw + Wd]


def _conv_and_dy(cfg, seed):
    rng = np.random.default_rng(seed)
    conv = L.Conv2D(cfg["C"], cfg["O"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                    bias=cfg["bias"], dtype=np.float64)
    conv.params["W"][...] = rng.standard_normal(conv.params["W"].shape)
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"]))
    y = conv.forward(x)
    dy = rng.standard_normal(y.shape)
    return conv, x, dy


@hyp(30)
@given(cfg=conv_configs(max_kernel=4, max_stride=3, max_pad=2, max_extra=4, max_channels=2))
def test_seed_backward_input_formula_matches_conv2d(cfg):
    conv, x, dy = _conv_and_dy(cfg, seed=40)
    dx_layer = conv.backward(dy)
    W = conv.params["W"]
    dx_loops = seed_backward_input_loops(dy, W, x.shape[2:], conv.stride, conv.padding)
    dx_seed = conv2d_backward_input_seed(dy, W, x.shape[2:], conv.stride, conv.padding)
    assert dx_layer.shape == x.shape
    np.testing.assert_allclose(dx_layer, dx_loops, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dx_seed, dx_loops, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(N=1, C=2, O=3, H=7, W=7, kernel=(3, 3), stride=(2, 2), padding=(1, 1), bias=True),
                 id="s2-p1-exact"),
    pytest.param(dict(N=2, C=1, O=2, H=8, W=8, kernel=(3, 3), stride=(2, 2), padding=(1, 1), bias=True),
                 id="s2-p1-remainder"),
    pytest.param(dict(N=1, C=2, O=2, H=9, W=6, kernel=(2, 3), stride=(3, 2), padding=(2, 1), bias=False),
                 id="s3x2-p2x1-nonsquare"),
    pytest.param(dict(N=1, C=1, O=1, H=5, W=5, kernel=(4, 4), stride=(3, 3), padding=(2, 2), bias=True),
                 id="s3-p2-k4"),
])
def test_seed_backward_input_formula_named_cases(cfg):
    conv, x, dy = _conv_and_dy(cfg, seed=41)
    dx_loops = seed_backward_input_loops(dy, conv.params["W"], x.shape[2:], conv.stride, conv.padding)
    np.testing.assert_allclose(conv.backward(dy), dx_loops, rtol=1e-11, atol=1e-12)


def test_seed_backward_input_loops_match_scatter_definition():
    """Cross-check the loop reference itself against dL/dx's scatter definition."""
    rng = np.random.default_rng(42)
    N, C, O, H, Wd, kh, kw, sh, sw, ph, pw = 1, 2, 2, 6, 7, 3, 2, 2, 3, 1, 2
    W = rng.standard_normal((O, C, kh, kw))
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
    dy = rng.standard_normal((N, O, Ho, Wo))
    # y[n,o,i,j] = sum xpad[n,c,i*sh+u,j*sw+v] W[o,c,u,v]  =>  scatter dy back
    dxp = np.zeros((N, C, H + 2 * ph, Wd + 2 * pw))
    for i in range(Ho):
        for j in range(Wo):
            for u in range(kh):
                for v in range(kw):
                    dxp[:, :, i * sh + u, j * sw + v] += np.einsum("no,oc->nc", dy[:, :, i, j], W[:, :, u, v])
    expected = dxp[:, :, ph : ph + H, pw : pw + Wd]
    got = seed_backward_input_loops(dy, W, (H, Wd), (sh, sw), (ph, pw))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
