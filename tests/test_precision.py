"""Precision modes (gpucnn/precision.py): the roundings bit for bit, the GEMMs in each mode, the option.

References: hand-computed float32 bit patterns (ties to even, carries into the
exponent, subnormals, NaN, Inf), an arithmetic round-to-nearest-even on the
significand (``np.frexp`` + ``np.rint``; for fp16 also on its subnormal grid
and its overflow threshold) and torch's bfloat16 and float16 casts; the conv
and dense GEMMs against float64 torch computed from the rounded operands, on
the NumPy path and on the unchanged kernels (emulator) with the operands
rounded before launch.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn as gc
from backends import backend_fixture
from gpucnn import precision
from gpucnn.functional import conv2d_backward, conv2d_forward, dense_backward, dense_forward

backend = backend_fixture()


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _from_bits(*words):
    return np.array(words, np.uint32).view(np.float32)


# -- the roundings ---------------------------------------------------------------------------
# (input bits, bf16 result bits, tf32 result bits)
CASES = [
    (0x3F800000, 0x3F800000, 0x3F800000),   # 1.0 exactly
    (0x3F808000, 0x3F800000, 0x3F808000),   # bf16: half an ulp above 1, kept lsb even: down
    (0x3F818000, 0x3F820000, 0x3F818000),   # bf16: a tie with an odd kept lsb: up to even
    (0x3F807FFF, 0x3F800000, 0x3F808000),   # bf16: just below the tie: down; tf32: rounds up
    (0x3F808001, 0x3F810000, 0x3F808000),   # bf16: just above the tie: up
    (0x3F801000, 0x3F800000, 0x3F800000),   # tf32: a tie with an even kept lsb: down
    (0x3F803000, 0x3F800000, 0x3F804000),   # tf32: a tie with an odd kept lsb: up
    (0x3F801001, 0x3F800000, 0x3F802000),   # tf32: just above the tie: up
    (0x3FFFFFFF, 0x40000000, 0x40000000),   # a carry out of the mantissa into the exponent
    (0xBFFF8000, 0xC0000000, 0xBFFF8000),   # negative: bf16 tie with odd lsb, away from 0 by magnitude
    (0x7F7FFFFF, 0x7F800000, 0x7F800000),   # the largest finite float32 rounds to Inf
    (0x7F7F7FFF, 0x7F7F0000, 0x7F7F8000),   # ... a smaller one stays finite
    (0x00008000, 0x00000000, 0x00008000),   # subnormal tie, even: to zero (bf16)
    (0x00018000, 0x00020000, 0x00018000),   # subnormal tie, odd: up
    (0x007FFFFF, 0x00800000, 0x00800000),   # the largest subnormal carries into the smallest normal
    (0x00000001, 0x00000000, 0x00000000),   # the smallest subnormal
    (0x80000000, 0x80000000, 0x80000000),   # -0
    (0x7F800000, 0x7F800000, 0x7F800000),   # +Inf
    (0xFF800000, 0xFF800000, 0xFF800000),   # -Inf
]


@pytest.mark.parametrize("word, bf16, tf32", CASES, ids=[f"{c[0]:08x}" for c in CASES])
def test_rounding_hand_computed_bit_patterns(word, bf16, tf32):
    x = _from_bits(word)
    assert _bits(precision.round_bf16(x))[0] == bf16, f"bf16({word:#010x})"
    assert _bits(precision.round_tf32(x))[0] == tf32, f"tf32({word:#010x})"


@pytest.mark.parametrize("rnd", [precision.round_bf16, precision.round_tf32])
def test_nan_stays_a_quiet_nan_of_its_sign(rnd):
    """A NaN whose payload lies only in the dropped bits must not truncate to Inf."""
    x = _from_bits(0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF)
    r = _bits(rnd(x))
    assert np.isnan(r.view(np.float32)).all()
    assert list(r >> 31) == [0, 1, 0, 0]
    assert (r & 0x00400000).all()


def _rne_reference(x, bits):
    """Round-to-nearest-even to ``bits + 1`` significant bits by arithmetic (normal numbers)."""
    m, e = np.frexp(x.astype(np.float64))                  # x = m 2^e, 0.5 <= |m| < 1
    return (np.rint(m * 2.0 ** (bits + 1)) * 2.0 ** (e - bits - 1)).astype(np.float32)


@pytest.mark.parametrize("rnd, bits", [(precision.round_bf16, 7), (precision.round_tf32, 10)])
def test_rounding_matches_arithmetic_round_to_nearest_even(rnd, bits):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype(np.float32)
    # exact ties at every scale: significand with a 1 just below the kept bits
    ties = (rng.integers(1 << bits, 1 << (bits + 1), 2000) * 2 + 1) * 2.0 ** rng.integers(-30, 30, 2000)
    x = np.concatenate([x, (ties / 2.0 ** (bits + 1)).astype(np.float32)])
    got = rnd(x)
    want = _rne_reference(x, bits)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    np.testing.assert_array_equal(_bits(rnd(got)), _bits(got))          # idempotent


def test_bf16_matches_torch_on_every_kind_of_bit_pattern():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2 ** 32, 200000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    got = precision.round_bf16(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(want)[~nan])
    assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("mode, host", [("bf16", precision.round_bf16), ("tf32", precision.round_tf32),
                                        ("fp16", lambda a: a.astype(np.float16).astype(np.float32))])
def test_the_tensor_core_kernels_round_as_the_host_bit_for_bit(backend, mode, host):
    """kernels/rounding.cuh, as the tensor-core GEMMs apply it while staging (an identity GEMM,
    y = x * 1 with one k: the product and the FP32 sum are exact), against the host's rounding;
    fp16 against NumPy's float16 cast (round to nearest even, overflow to Inf, subnormals)."""
    if not backend.kernels:
        pytest.skip("a kernel test")
    from gpucnn.cuda import gemm_tc

    rng = np.random.default_rng(9)
    words = np.concatenate([rng.integers(0, 2 ** 32, 3000, dtype=np.uint64).astype(np.uint32),
                            np.array([c[0] for c in CASES] + [0x7F800001, 0xFF800001, 0x7FFFFFFF], np.uint32)])
    if mode == "fp16":           # also the binary16 edges: 65504, the tie at 65520, 2^-24, 2^-25, ...
        edges = np.array([65504, 65519.99, 65520, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14,
                          2.0 ** -14 - 2.0 ** -25, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11], np.float32)
        words = np.concatenate([words, edges.view(np.uint32), (-edges).view(np.uint32),
                                (rng.standard_normal(2000) * 2.0 ** rng.integers(-30, 20, 2000)).astype(
                                    np.float32).view(np.uint32)])
    x = words.view(np.float32)[None, :].copy()
    with np.errstate(over="ignore"):
        want = host(x)
    got = backend.get(gemm_tc.dense_forward(backend.put(x), backend.put(np.ones((1, 1), np.float32)), None,
                                            mode=mode)[0])
    nan = np.isnan(want)
    zero = want == 0                        # 0 + (-0 * 1) is +0: the sign of a zero is the GEMM's
    np.testing.assert_array_equal(_bits(got)[~nan & ~zero], _bits(want)[~nan & ~zero])
    assert np.isnan(got[nan]).all() and (got[zero] == 0).all()
    with pytest.raises(TypeError, match="multiplies float32 arrays"):
        gemm_tc.dense_forward(backend.put(np.ones((1, 3))), backend.put(np.ones((1, 1))), None, mode=mode)


def test_split_tf32_parts_are_tf32_and_sum_to_x_within_2_to_the_minus_21():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10000).astype(np.float32)
    hi, lo = precision.split_tf32(x)
    for part in (hi, lo):
        np.testing.assert_array_equal(_bits(precision.round_tf32(part)), _bits(part))
    err = np.abs(hi.astype(np.float64) + lo - x) / np.abs(x)
    assert err.max() <= 2.0 ** -21 and np.abs(lo).max() > 0


def test_rounding_refuses_float64_and_names_the_modes():
    for rnd in (precision.round_bf16, precision.round_fp16):
        with pytest.raises(TypeError, match="float32 operands, got dtype float64"):
            rnd(np.ones(3))
    with pytest.raises(ValueError, match=r"one of 'fp32', 'tf32', '3xtf32', 'bf16', 'fp16', got precision='fp8'$"):
        precision.check_mode("fp8")
    assert precision.check_mode("fp16") == "fp16"


# -- fp16 ---------------------------------------------------------------------------------------
# (float32 input, its fp16 rounding), worked out by hand: fp16 keeps 11 significant bits from 2^-14
# up (ulp 2^-10 at 1), below that multiples of 2^-24, and its largest finite is 65504 = (2 - 2^-10) 2^15
FP16_CASES = [
    (1.0, 1.0),
    (1 + 2 ** -11, 1.0),                         # a tie above 1, kept lsb even: down
    (1 + 3 * 2 ** -11, 1 + 2 ** -9),             # a tie with an odd kept lsb: up to even
    (1 + 2 ** -11 + 2 ** -23, 1 + 2 ** -10),     # just above the tie: up
    (1 + 2 ** -11 - 2 ** -23, 1.0),              # just below the tie: down
    (2 - 2 ** -12, 2.0),                         # a carry out of the mantissa into the exponent
    (-(1 + 3 * 2 ** -11), -(1 + 2 ** -9)),       # negative: by magnitude
    (65504.0, 65504.0),                          # the largest finite
    (65519.99, 65504.0),                         # below the tie at 65520 = 65504 + ulp/2: down
    (65520.0, np.inf),                           # the tie, odd lsb: up, past the largest finite: Inf
    (-65520.0, -np.inf),
    (1e30, np.inf),
    (2.0 ** -14, 2.0 ** -14),                    # the smallest normal
    (2.0 ** -14 - 2 ** -25, 2.0 ** -14),         # a tie on the subnormal grid just below it, odd: up
    (2.0 ** -24, 2.0 ** -24),                    # the smallest subnormal
    (2.0 ** -25, 0.0),                           # half of it: a tie, to even (0)
    (2.0 ** -25 + 2 ** -40, 2.0 ** -24),         # just above that tie: up
    (3 * 2.0 ** -26, 2.0 ** -24),                # 0.75 of it: up
    (3 * 2.0 ** -25, 2 * 2.0 ** -24),            # 1.5 of it: a tie, odd: up to 2
    (5 * 2.0 ** -25, 2 * 2.0 ** -24),            # 2.5 of it: a tie, even: down to 2
    (1e-10, 0.0),
    (-(2.0 ** -25), -0.0),                       # a negative tie to zero keeps the sign
    (-0.0, -0.0),
    (np.inf, np.inf),
    (-np.inf, -np.inf),
]


@pytest.mark.parametrize("value, want", FP16_CASES, ids=[repr(c[0]) for c in FP16_CASES])
def test_fp16_rounding_hand_computed(value, want):
    got = precision.round_fp16(np.array([value], np.float32))
    assert got.dtype == np.float32
    assert _bits(got)[0] == _bits(np.float32(want)), f"fp16({value!r}) = {got[0]!r}, want {want!r}"


def _fp16_reference(x):
    """Round to nearest even onto fp16's values by arithmetic in float64: 11 significant bits for
    normals, multiples of 2^-24 below 2^-14, Inf from 65520 up (the midpoint past 65504)."""
    x = x.astype(np.float64)
    m, e = np.frexp(x)
    e = np.maximum(e, -13)                                # below 2^-14: the fixed subnormal quantum 2^-24
    r = np.rint(x * 2.0 ** (11 - e)) * 2.0 ** (e - 11)
    return np.where(np.abs(x) >= 65520.0, np.copysign(np.inf, x), r).astype(np.float32)


def test_fp16_matches_arithmetic_rounding_and_torch_on_every_kind_of_bit_pattern():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 2 ** 32, 200000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # and the interesting range densely: fp16's subnormals, normals and overflow, with exact ties
    ties = ((rng.integers(1 << 10, 1 << 11, 4000) * 2 + 1) * 2.0 ** rng.integers(-35, 6, 4000)).astype(np.float32)
    x = np.concatenate([x, (rng.standard_normal(50000) * 10.0 ** rng.integers(-9, 6, 50000)).astype(np.float32),
                        ties, -ties])
    got = precision.round_fp16(x)
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all() and not np.isnan(got[~nan]).any()
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(_fp16_reference(x[~nan])))
    np.testing.assert_array_equal(_bits(precision.round_fp16(got)), _bits(got))         # idempotent
    out = np.empty_like(x)
    assert precision.round_fp16(x, out=out) is out
    np.testing.assert_array_equal(_bits(out), _bits(got))
    torch = pytest.importorskip("torch")
    want = torch.from_numpy(x.copy()).to(torch.float16).float().numpy()
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(want)[~nan])


def test_fp16_rounding_warns_nothing_on_overflow():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(precision.round_fp16(np.array([1e6, -7e4], np.float32))).all()


def test_using_is_scoped_and_restored():
    assert precision.current() == "fp32"
    with pytest.raises(RuntimeError):
        with precision.using("bf16"):
            assert precision.current() == "bf16"
            with precision.using("tf32"):
                assert precision.current() == "tf32"
            assert precision.current() == "bf16"
            raise RuntimeError
    assert precision.current() == "fp32"


# -- the GEMMs in each mode -------------------------------------------------------------------
def _operand(a, mode):
    """float64 of the operand a tensor core multiplies (3xtf32: the FP32 value it approximates)."""
    return np.asarray(a if mode in ("fp32", "3xtf32") else precision.round_operand(a, mode), np.float64)


def _torch_conv(x, W, b, dz, stride, padding, mode):
    """float64 torch: y, dx, dW from the rounded operands; db the sum of the rounded dz (the GEMM's ones row)."""
    torch = pytest.importorskip("torch")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))      # noqa: E731
    xt = t(_operand(x, mode).transpose(3, 0, 1, 2)).requires_grad_()
    Wt = t(_operand(W, mode)).requires_grad_()
    y = torch.nn.functional.conv2d(xt, Wt, t(b.astype(np.float64)), stride=stride, padding=padding)
    y.backward(t(_operand(dz, mode).transpose(3, 0, 1, 2)))
    return (y.detach().numpy().transpose(1, 2, 3, 0), xt.grad.numpy().transpose(1, 2, 3, 0), Wt.grad.numpy(),
            _operand(dz, mode).sum(axis=(1, 2, 3)))


def _close(got, want, what, rtol=1e-5):
    """Within float32 accumulation error of ``want``, measured against its scale."""
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got, np.float64) - want).max()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"
    return err / scale


@pytest.mark.parametrize("mode", ["tf32", "bf16", "3xtf32", "fp16"])
def test_conv_in_each_mode_matches_float64_of_the_rounded_operands(backend, mode):
    rng = np.random.default_rng(4)
    C, O, H, N, k, stride, padding = 3, 5, 9, 7, 3, (2, 1), (1, 0)
    x = rng.standard_normal((C, H, H + 1, N)).astype(np.float32)
    W = rng.standard_normal((O, C, k, k)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    with precision.using("fp32"):
        y32, s32 = conv2d_forward(backend.put(x), backend.put(W), backend.put(b), stride, padding)
    dz = rng.standard_normal(y32.shape).astype(np.float32)
    y_ref, dx_ref, dW_ref, db_ref = _torch_conv(x, W, b, dz, stride, padding, mode)
    with precision.using(mode):
        y, saved = conv2d_forward(backend.put(x), backend.put(W), backend.put(b), stride, padding)
        dx, dW, db = conv2d_backward(backend.put(dz), saved)
    rtol = 2e-6 if mode == "3xtf32" else 1e-6
    for got, want, what in ((y, y_ref, "y"), (dx, dx_ref, "dx"), (dW, dW_ref, "dW"), (db, db_ref, "db")):
        _close(backend.get(got), want, f"{mode} {what}", rtol)
    if mode != "3xtf32":       # the test can tell: fp32 is far from the rounded reference
        assert np.abs(backend.get(y32) - y_ref).max() > 100 * 1e-6 * np.abs(y_ref).max()


@pytest.mark.parametrize("mode", ["tf32", "bf16", "3xtf32", "fp16"])
def test_dense_in_each_mode_matches_float64_of_the_rounded_operands(backend, mode):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 11)).astype(np.float32)
    W = rng.standard_normal((13, 37)).astype(np.float32)
    b = rng.standard_normal(13).astype(np.float32)
    dz = rng.standard_normal((13, 11)).astype(np.float32)
    xr, Wr, dzr = _operand(x, mode), _operand(W, mode), _operand(dz, mode)
    # the dense bias gradient is fused with the activation's derivative, before any rounding: exact dz
    refs = {"y": Wr @ xr + b[:, None], "dx": Wr.T @ dzr, "dW": dzr @ xr.T, "db": dz.astype(np.float64).sum(1)}
    with precision.using(mode):
        y, saved = dense_forward(backend.put(x), backend.put(W), backend.put(b))
        dx, dW, db = dense_backward(backend.put(dz), saved)
    for got, what in ((y, "y"), (dx, "dx"), (dW, "dW"), (db, "db")):
        _close(backend.get(got), refs[what], f"{mode} {what}", 2e-6)


def test_3xtf32_is_within_fp32_tolerance_of_fp32_and_tf32_is_not():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 14, 14, 16)).astype(np.float32)
    W = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    out = {}
    for mode in ("fp32", "3xtf32", "tf32"):
        with precision.using(mode):
            out[mode] = conv2d_forward(x, W, None, (1, 1), (0, 0))[0].copy()
    scale = np.abs(out["fp32"]).max()
    assert np.abs(out["3xtf32"] - out["fp32"]).max() <= 1e-6 * scale
    assert np.abs(out["tf32"] - out["fp32"]).max() > 1e-5 * scale


def test_fp32_mode_rounds_nothing_and_gives_the_same_bits(monkeypatch):
    """fp32 inside ``using`` is the plain path: no rounding is ever called, the bits are those outside it."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 8, 5)).astype(np.float32)
    W = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)

    def run():
        y, s = conv2d_forward(x, W, b, (1, 1), (1, 1), act="relu")
        grads = conv2d_backward(np.ones_like(y), s)
        h, ds = dense_forward(y.reshape(-1, 5), rng2.standard_normal((3, 256)).astype(np.float32), None)
        return [a.copy() for a in (y, *grads, h, *dense_backward(np.ones_like(h), ds)[:2])]

    rng2 = np.random.default_rng(8)
    before = run()

    def no_rounding(*a, **k):
        raise AssertionError("fp32 rounded an operand")

    monkeypatch.setattr(precision, "_round_mantissa", no_rounding)
    rng2 = np.random.default_rng(8)
    with precision.using("fp32"):
        after = run()
    for a, c in zip(before, after):
        np.testing.assert_array_equal(a, c)


# -- the option, end to end -------------------------------------------------------------------
def test_run_options_take_the_modes_on_every_device():
    from gpucnn.train.options import PRECISIONS, RunOptions

    assert PRECISIONS == ("fp32", "tf32", "3xtf32", "bf16", "fp16")
    for mode in PRECISIONS:
        assert RunOptions(precision=mode).precision == mode
    with pytest.raises(ValueError, match=r"precision must be one of .*got precision='fp8'"):
        RunOptions(precision="fp8")
    for mode in PRECISIONS:                   # no GPU here: nothing to refuse (sm_80+ is checked on one)
        RunOptions(precision=mode).check_device("cuda")
    with RunOptions(precision="bf16").applied():
        assert precision.current() == "bf16"
    assert precision.current() == "fp32"


def test_bf16_training_steps_lower_the_loss_and_differ_from_fp32():
    ds = gc.data.load_dataset("mnist")
    x = gc.data.normalize(ds.train_images[:256], "mnist")
    y = ds.train_labels[:256]
    losses = {}
    for mode in ("bf16", "fp32"):
        gc.seed(0)
        model = gc.models.build("lenet5")
        opt = gc.optim.SGD(model, lr=0.05, momentum=0.9)
        trainer = gc.train.Trainer(model, gc.losses.SoftmaxCrossEntropy(), opt, batch_size=64)
        with precision.using(mode):
            losses[mode] = [trainer.step(x[i % 4 * 64:(i % 4 + 1) * 64], y[i % 4 * 64:(i % 4 + 1) * 64])[0]
                            for i in range(12)]
    bf16 = [float(v) for v in losses["bf16"]]
    assert np.mean(bf16[-4:]) < 0.7 * np.mean(bf16[:4]), bf16
    assert bf16 != [float(v) for v in losses["fp32"]]


def test_train_records_the_precision(tmp_path):
    from gpucnn.train import TrainConfig, train

    cfg = TrainConfig(model="seed002_c1", epochs=1, batch_size=64, subset=128, test_subset=64, seed=1)
    result = train(cfg, device="cpu", precision="bf16", out_dir=tmp_path / "r", progress=False, log=None)
    assert result.metrics[-1]["precision"] == "bf16"
    assert gc.checkpoint.load_checkpoint(result.checkpoint).metrics["precision"] == "bf16"
    assert precision.current() == "fp32"


@pytest.mark.parametrize("mode", ["tf32", "3xtf32", "bf16"])
def test_a_tensor_core_cuda_step_has_the_fp32_launch_count_and_is_still_a_cuda_graph(mode):
    """On the CuPy stand-in: every GEMM of lenet5 runs on the tensor-core kernels, which round as they
    load (no extra launch), with no allocation, no CuPy op and no sync: the step is captured."""
    from gpucnn.bench.static import graph_step, static_step

    fp32 = [k["name"] for k in static_step("lenet5", 64, steps=3, repeats=1)["kernels"]]
    with precision.using(mode):
        row = static_step("lenet5", 64, steps=3, repeats=1)
        graph = graph_step("lenet5", 64, steps=3, repeats=1)
    names = [k["name"] for k in row["kernels"]]
    tc = [n for n in names if n.startswith("gemm_tc_")]
    # the fp32 dense backward is one launch (dense_backward); the tensor-core modes keep three per
    # layer (dense_backward_act, then the dW and dx GEMMs)
    assert len(names) == len(fp32) + 2 * 3, (names, fp32)
    # 2 conv layers x (forward, backward-weight) + 1 backward-input, 3 dense x (forward, dW) + 3 dx
    assert len(tc) == 5 + 9 and all(n.startswith(f"gemm_tc_{mode}_") for n in tc), tc
    assert not {"conv_forward", "conv_backward_input", "conv_backward_weight_partial", "dense_forward",
                "gemm_nt", "gemm_tn"} & set(names), names
    assert row["allocations"] == 0 and row["xp_ops"] == 0 and row["syncs"] == []
    assert graph["captured"] and graph["launches"] == 0


def test_forked_micro_batch_workers_run_the_mode_of_each_step():
    """Workers forked during an fp32 step must run the next, bf16, step in bf16: the loss and the
    updated parameters equal those of one thread (no workers), as for any thread count."""
    from gpucnn import threads

    ds = gc.data.load_dataset("mnist")
    x = gc.data.normalize(ds.train_images[:64], "mnist")
    y = ds.train_labels[:64]
    grads = {}
    before = threads.get_num_threads()
    try:
        for n in (1, 2):
            threads.set_num_threads(n)
            gc.seed(0)
            model = gc.models.build("lenet5")
            opt = gc.optim.SGD(model, lr=0.05, momentum=0.9)
            trainer = gc.train.Trainer(model, gc.losses.SoftmaxCrossEntropy(), opt, batch_size=64)
            trainer.step(x, y)                                  # fp32: the workers are forked here
            with precision.using("bf16"):
                loss = float(trainer.step(x, y)[0])
            grads[n] = (loss, [np.array(v) for v in model.state_dict().values()])   # updated by the step
    finally:
        threads.set_num_threads(before)
    assert grads[1][0] == grads[2][0]
    for a, b in zip(grads[1][1], grads[2][1]):
        np.testing.assert_array_equal(a, b)
