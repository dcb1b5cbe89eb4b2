"""Dynamic loss scaling (gpucnn/train/scaler.py, kernels/amp.cu, the optimizers' skip flag): fp16's other half.

What is checked, and against what:

* the scale's rule (halve on overflow, double after ``growth_interval`` good
  steps, floor and ceiling) against a few lines of Python written here;
* a step whose fp16 gradients overflow changes no parameter and no optimizer
  slot, bit for bit (SGD and Adam), and halves the scale; finite steps grow
  it; scaling an fp32 run changes none of its bits (every factor is a power
  of two), and in fp16 it keeps gradients that would round to zero;
* the kernels (``amp_scale``, ``amp_unscale_check``, ``amp_update``,
  ``sgd_update_skip``, ``adam_update_skip``) on the CPU emulator against the
  NumPy path bit for bit, and a whole scaled step replayed as a CUDA graph
  (the CuPy stand-in, the kernels on the emulator) equal to eager steps bit
  for bit, with steps skipped inside the replays;
* the state in checkpoints: saved, restored, refused when malformed, and a
  run stopped and resumed equal to the uninterrupted run bit for bit;
* ``gpucnn train --precision fp16`` end to end, and data-parallel at size 1.
"""
from __future__ import annotations

import contextlib
import json
import types
import warnings

import numpy as np
import pytest

import gpucnn as gc
from backends import KERNEL_BACKENDS, emulator_builder, replay_data, replay_net, skip_without_emulator, use_backend
from gpucnn import checkpoint as ck
from gpucnn import losses, optim, precision
from gpucnn.functional import _dispatch
from gpucnn.train import LossScaler


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _rule(scale, good, skipped, found, interval, lo, hi):
    """The loss scale's rule, written out: halve on overflow (not below ``lo``), else double after
    ``interval`` good steps in a row (not above ``hi``)."""
    if found:
        return max(scale / 2, lo), 0, skipped + 1
    good += 1
    if good == interval:
        return min(scale * 2, hi), 0, skipped
    return scale, good, skipped


@contextlib.contextmanager
def _numpy_path():
    """The NumPy path for the block, even where a test's backend routes NumPy arrays to the kernels."""
    saved = _dispatch.use_kernels
    _dispatch.use_kernels = lambda *arrays: False
    try:
        yield
    finally:
        _dispatch.use_kernels = saved


def _groups(*grads):
    """An optimizer-like object with flat float32 gradient buffers (what LossScaler.bind reads)."""
    return types.SimpleNamespace(groups=[types.SimpleNamespace(dtype=np.dtype(g.dtype), grads=g) for g in grads])


def _state(opt, model):
    """Every parameter and optimizer slot, as bytes."""
    out = {k: np.asarray(v).tobytes() for k, v in model.state_dict().items()}
    out.update({f"slot/{k}": v.tobytes() for k, v in opt.state_dict()["slots"].items()})
    return out


# -- the rule ------------------------------------------------------------------------------------
def test_the_rule_halves_on_overflow_grows_after_the_interval_and_keeps_its_bounds():
    """A scripted sequence of finite and overflowing gradients against the rule written above."""
    g = np.ones(7, np.float32)
    sc = LossScaler(init_scale=2.0 ** 3, growth_interval=3, min_scale=2.0, max_scale=2.0 ** 5)
    sc.bind(_groups(g))
    want, scales = (8.0, 0, 0), []
    pattern = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]   # 1: an Inf in the gradients
    for found in pattern:
        g[...] = sc.scale                      # a scaled gradient of 1 ...
        if found:
            g[3] = np.inf                      # ... with one overflowed element
        flag = sc.unscale_()
        assert int(flag[0]) == found
        if not found:
            assert (g == 1.0).all()            # unscaled exactly
        sc.update()
        want = _rule(*want, found, 3, 2.0, 2.0 ** 5)
        assert (sc.scale, sc.good_steps, sc.skipped_steps) == want
        assert int(sc.arrays()[1][0]) == 0     # the flag is cleared for the next step
        scales.append(sc.scale)
    assert scales[8:10] == [32.0, 32.0] and scales[15:19] == [2.0, 2.0, 2.0, 2.0]   # the ceiling, the floor
    assert sc.scale == 4.0 and sc.skipped_steps == 6
    np.testing.assert_array_equal(sc.arrays()[0], np.float32([4.0, 0.25]))


def test_the_scaler_refuses_what_it_cannot_scale():
    for bad in (3.0, 0.0, -2.0, float("inf"), 2.0 ** 127, True, "8"):
        with pytest.raises(ValueError, match="init_scale must be a power of two"):
            LossScaler(init_scale=bad)
    with pytest.raises(ValueError, match="growth_interval must be an integer >= 1, got growth_interval=0"):
        LossScaler(growth_interval=0)
    with pytest.raises(ValueError, match="init_scale must lie in"):
        LossScaler(init_scale=0.5)
    net64 = gc.layers.Sequential(gc.layers.Dense(3, 2, dtype=np.float64))
    with pytest.raises(TypeError, match="float32 parameters .* got a float64 parameter buffer"):
        LossScaler().bind(optim.SGD(net64))
    with pytest.raises(RuntimeError, match="not bound"):
        LossScaler().unscale_()


# -- the train step on NumPy ---------------------------------------------------------------------
def _trainer(make_opt, scaler, batch=5):
    model = replay_net()
    opt = make_opt(model)
    return model, opt, gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), opt, batch_size=batch,
                                        loss_scaler=scaler)


_SGD = lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)  # noqa: E731
_ADAM = lambda m: optim.Adam(m, lr=0.01)  # noqa: E731


@pytest.mark.parametrize("make_opt", [_SGD, _ADAM], ids=["sgd", "adam"])
def test_an_overflowing_fp16_step_changes_nothing_and_halves_the_scale(make_opt):
    x, y, _ = replay_data()
    sc = LossScaler(init_scale=2.0 ** 4)
    model, opt, trainer = _trainer(make_opt, sc)
    with precision.using("fp16"):
        trainer.step(x[:5], y[:5])                          # a finite step: the slots hold something
        assert sc.skipped_steps == 0 and any(np.abs(v).max() > 0 for v in opt.state_dict()["slots"].values())
        state = sc.state_dict()
        sc.load_state_dict({**state, "scale": 2.0 ** 40})   # (1 - p) / 5 * 2^40 is far past fp16's 65504
        before, count = _state(opt, model), opt.step_count
        loss = float(trainer.step(x[5:10], y[5:10])[0])
    assert np.isfinite(loss)                                # the forward is fine: only the gradients overflow
    assert not all(np.isfinite(g.grads).all() for g in opt.groups)
    assert _state(opt, model) == before                     # not a bit changed
    assert opt.step_count == count + 1                      # the step is counted (see gpucnn.optim)
    assert (sc.scale, sc.good_steps, sc.skipped_steps) == (2.0 ** 39, 0, 1)


@pytest.mark.parametrize("make_opt, slots", [(_SGD, ["momentum"]), (_ADAM, ["m", "v"])], ids=["sgd", "adam"])
def test_a_skipped_first_step_makes_the_slots_as_zeros_like_the_kernels(make_opt, slots):
    x, y, _ = replay_data()
    sc = LossScaler(init_scale=2.0 ** 40)
    model, opt, trainer = _trainer(make_opt, sc)
    before = {k: np.asarray(v).tobytes() for k, v in model.state_dict().items()}
    with precision.using("fp16"):
        trainer.step(x[:5], y[:5])
    assert {k: np.asarray(v).tobytes() for k, v in model.state_dict().items()} == before
    st = opt.state_dict()["slots"]
    assert sorted({k.rsplit("/", 1)[1] for k in st}) == sorted(slots)
    assert all(not v.any() for v in st.values())


def test_the_scale_grows_after_growth_interval_good_steps_and_stops_at_the_ceiling():
    x, y, _ = replay_data()
    sc = LossScaler(init_scale=2.0 ** 4, growth_interval=3, max_scale=2.0 ** 5)
    _, _, trainer = _trainer(_SGD, sc)
    seen = []
    with precision.using("fp16"):
        for i in range(7):
            trainer.step(x[i % 4 * 5:(i % 4 + 1) * 5], y[i % 4 * 5:(i % 4 + 1) * 5])
            seen.append((sc.scale, sc.good_steps))
    assert sc.skipped_steps == 0
    assert seen == [(16.0, 1), (16.0, 2), (32.0, 0), (32.0, 1), (32.0, 2), (32.0, 0), (32.0, 1)]


def test_scaling_an_fp32_run_changes_none_of_its_bits():
    """Every factor is a power of two: the scaled loss gradient, the unscaled gradients and so the
    update are those of the unscaled run exactly (the scale moves: growth every 2 steps)."""
    x, y, orders = replay_data()
    runs = []
    for scaler in (None, LossScaler(init_scale=2.0 ** 10, growth_interval=2)):
        model, opt, trainer = _trainer(_SGD, scaler)
        losses_ = [trainer.run_steps(x, y, order, e, range(4), 4).loss_sum for e, order in enumerate(orders)]
        runs.append((losses_, _state(opt, model)))
    assert runs[0] == runs[1]
    assert scaler.scale == 2.0 ** 14


def test_fp16_rounds_small_gradients_to_zero_and_the_scale_keeps_them():
    """What the scale is for: a dense layer's gradients of 1e-9 are below fp16's smallest subnormal
    (2^-24 ~ 6e-8), so fp16 operands make them 0; scaled by 2^16 first and unscaled after, they are
    the fp32 gradients to fp16's rounding."""
    from gpucnn.functional import dense_backward, dense_forward

    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    W = rng.standard_normal((4, 16)).astype(np.float32)
    dz = (rng.standard_normal((4, 8)) * 1e-9).astype(np.float32)
    grads = {}
    for mode, S in (("fp32", 1.0), ("fp16", 1.0), ("fp16", 2.0 ** 16)):
        with precision.using(mode):
            _, saved = dense_forward(x, W, None)
            dx, dW, _ = dense_backward(dz * np.float32(S), saved)
        grads[mode, S] = (dx / np.float32(S), dW / np.float32(S))
    assert not grads["fp16", 1.0][1].any() and not grads["fp16", 1.0][0].any()
    for got, want in zip(grads["fp16", 2.0 ** 16], grads["fp32", 1.0]):
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


# -- the kernels on the emulator (and a GPU) -------------------------------------------------------
@pytest.fixture(params=KERNEL_BACKENDS)
def device(request, monkeypatch):
    with use_backend(request.param, request, monkeypatch) as dev:
        yield dev


def _specials(rng, n):
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    g[::97] = np.float32(3e38)
    g[5] = np.float32(1e-41)                     # a subnormal: exact on the emulator
    return g


def test_amp_scale_and_unscale_match_numpy_bit_for_bit(device):
    from gpucnn.cuda import amp

    rng = np.random.default_rng(1)
    g = _specials(rng, 1000)
    for S in (2.0 ** 16, 2.0 ** -3, 2.0 ** 100):
        scale = device.put(np.float32([S, 1 / S]))
        got = device.get(amp.scale_gradient(device.put(g.copy()), scale))
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(_bits(got), _bits(g * np.float32(S)))
            want = g * np.float32(1 / S)
        steps = device.put(np.int32([0, 5, 7]))
        got = device.get(amp.unscale_check(device.put(g.copy()), scale, steps))
        np.testing.assert_array_equal(_bits(got), _bits(want))
        assert device.get(steps).tolist() == [int(not np.isfinite(want).all()), 5, 7]


def test_amp_unscale_check_flags_inf_and_nan_anywhere_and_never_clears_the_flag(device):
    from gpucnn.cuda import amp

    scale = device.put(np.float32([4.0, 0.25]))
    for bad in (np.inf, -np.inf, np.nan):
        for where in (0, 300, 599):
            g = np.ones(600, np.float32)
            g[where] = bad
            steps = device.put(np.int32([0, 0, 0]))
            amp.unscale_check(device.put(g), scale, steps)
            assert device.get(steps)[0] == 1, (bad, where)
            amp.unscale_check(device.put(np.ones(600, np.float32)), scale, steps)   # a second, finite buffer
            assert device.get(steps)[0] == 1
    steps = device.put(np.int32([0, 0, 0]))
    amp.unscale_check(device.put(np.full(600, 3e38, np.float32)), scale, steps)      # large, finite
    assert device.get(steps)[0] == 0


def test_amp_update_follows_the_rule_bit_for_bit(device):
    from gpucnn.cuda import amp

    rng = np.random.default_rng(2)
    scale, steps = device.put(np.float32([2.0 ** 6, 2.0 ** -6])), device.put(np.int32([0, 0, 0]))
    want = (2.0 ** 6, 0, 0)
    for found in [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] + rng.integers(0, 2, 40).tolist():
        host = device.get(steps)
        host[0] = found
        steps = device.put(host)
        amp.update(scale, steps, 3, 2.0 ** 2, 2.0 ** 8)
        want = _rule(*want, found, 3, 2.0 ** 2, 2.0 ** 8)
        s = device.get(scale)
        np.testing.assert_array_equal(_bits(s), _bits(np.float32([want[0], 1 / want[0]])))
        assert device.get(steps).tolist() == [0, want[1], want[2]]


def test_the_scaler_on_the_kernels_equals_the_scaler_on_numpy(device):
    """Two flat buffers, a run of steps with planted Inf/NaN: the same gradients, flags and state."""
    rng = np.random.default_rng(4)
    runs = []
    for kernels in (True, False):
        rng = np.random.default_rng(4)
        with contextlib.nullcontext() if kernels else _numpy_path():
            bufs = [device.put(np.zeros(n, np.float32)) for n in (300, 41)]
            sc = LossScaler(init_scale=2.0 ** 5, growth_interval=2, max_scale=2.0 ** 9)
            sc.bind(_groups(*bufs))
            trace = []
            for step in range(24):
                for b in bufs:
                    host = (rng.standard_normal(b.size) * sc.scale).astype(np.float32)
                    if rng.random() < 0.25:
                        host[rng.integers(b.size)] = rng.choice([np.inf, np.nan])
                    b[...] = device.put(host)
                flag = sc.unscale_()
                trace.append((int(device.get(flag)[0]), [device.get(b).tobytes() for b in bufs]))
                sc.update()
                trace.append(sc.state_dict())
        runs.append(trace)
    assert runs[0] == runs[1]
    assert any(t[0] for t in runs[0][::2]) and not all(t[0] for t in runs[0][::2])


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_the_skip_kernels_change_nothing_when_flagged_and_equal_the_plain_kernels_when_not(opt, device):
    from gpucnn.cuda import optim as kopt

    rng = np.random.default_rng(5)
    p0, g, m0, v0 = (rng.standard_normal(700).astype(np.float32) for _ in range(4))
    v0 = np.abs(v0)
    hyper = device.put(np.float32(kopt.adam_hyper(1e-3, (0.9, 0.99), 3) if opt == "adam" else (0.1,)))

    def step(skip):
        p, m, v = device.put(p0.copy()), device.put(m0.copy()), device.put(v0.copy())
        if opt == "sgd":
            kopt.sgd_update(p, device.put(g), v, hyper, 0.9, 1e-3, True, skip=skip)
        else:
            kopt.adam_update(p, device.put(g), m, v, hyper, (0.9, 0.99), 1e-8, 1e-3, skip=skip)
        return [device.get(a).tobytes() for a in (p, m, v)]

    assert step(device.put(np.int32([1, 0, 0]))) == [a.tobytes() for a in (p0, m0, v0)]
    plain = step(None)
    assert step(device.put(np.int32([0, 9, 9]))) == plain and plain[0] != p0.tobytes()
    with pytest.raises(TypeError, match="skip must be a 1-D int32 device array"):
        kopt.sgd_update(device.put(p0.copy()), device.put(g), None, hyper, 0.0, 0.0, False,
                        skip=device.put(np.float32([0])))


def test_amp_wrappers_refuse_bad_arguments(device):
    from gpucnn.cuda import amp

    scale, steps = device.put(np.float32([2.0, 0.5])), device.put(np.int32([0, 0, 0]))
    with pytest.raises(TypeError, match="amp_scale: dy must be float32"):
        amp.scale_gradient(device.put(np.ones(3)), scale)
    with pytest.raises(ValueError, match=r"amp_scale: scale must have shape \(2,\)"):
        amp.scale_gradient(device.put(np.ones(3, np.float32)), device.put(np.float32([2.0])))
    with pytest.raises(TypeError, match=r"amp_unscale_check: steps must be int32 of shape \(3,\)"):
        amp.unscale_check(device.put(np.ones(3, np.float32)), scale, device.put(np.float32([0, 0, 0])))
    with pytest.raises(ValueError, match="growth_interval must be an int >= 1"):
        amp.update(scale, steps, 0, 1.0, 4.0)


# -- the step as a CUDA graph (stand-in + emulator) ------------------------------------------------
def _graph_run(cuda_graph):
    """Two epochs of 23 samples in batches of 5, fp32 GEMMs, inputs x1000 so that a scale near 2^108 overflows
    FP32 in the weight gradients: with growth every step the scale climbs until a step overflows, is skipped and
    halved, over and over -- inside the graph's replays too."""
    from gpucnn.bench import standin
    from gpucnn.train.graph import GraphedStep

    skip_without_emulator()
    x, y, orders = replay_data()
    x = x * np.float32(1000)
    rec = standin.Recorder()
    with standin.installed(rec, builder=emulator_builder) as cp:
        model = replay_net().to("cuda")
        sc = LossScaler(init_scale=2.0 ** 108, growth_interval=1, max_scale=2.0 ** 126)
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False),
                                   optim.SGD(model, lr=0.1, momentum=0.9), batch_size=5,
                                   schedule=lambda e, s: 0.1 / (1 + e + s), sync_every=3, cuda_graph=cuda_graph,
                                   loss_scaler=sc)
        dx, dy = cp.asarray(x), cp.asarray(y)
        seen = []
        for epoch, order in enumerate(orders):
            trainer.run_steps(dx, dy, cp.asarray(order), epoch, range(5), 5,
                              on_sync=lambda st, k: seen.append((st.loss_sum, st.correct, st.seen)))
        state = {k: np.asarray(v).tobytes() for k, v in model.state_dict().items()}
        validated = [g for g in trainer._graphs.values() if isinstance(g, GraphedStep) and g.validated]
        kernels = [e.name for e in rec.events if e.kind == "kernel"]
        return (seen, state, sc.state_dict(), trainer.optimizer.step_count, len(validated),
                sum(e.kind == "graph" for e in rec.events), kernels)


@pytest.mark.cudasim
def test_a_scaled_step_replays_as_a_cuda_graph_bit_for_bit_with_skips_inside_the_replays():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a refused graph would warn
        eager, graphed = _graph_run(False), _graph_run(True)
    assert eager[:4] == graphed[:4]                      # losses, parameters, the scaler, the step count
    assert graphed[4] == 1 and graphed[5] == 2 + 4       # 4 replays after the two checking ones
    skipped = eager[2]["skipped_steps"]
    assert 2 <= skipped <= 8, eager[2]                   # both kinds of step, some in replays
    first = eager[6][:eager[6].index("gather_batch", 1)]  # one eager step's launches, in order
    assert first == ["gather_batch", "conv_forward", "pool_max_forward", "dense_forward", "xent_forward_backward",
                     "amp_scale", "dense_backward", "pool_max_backward",
                     "conv_backward_weight_partial", "conv_backward_weight_reduce", "amp_unscale_check",
                     "sgd_update_skip", "amp_update"]


# -- checkpoints and resume ----------------------------------------------------------------------
def test_checkpoints_keep_the_scaler_and_refuse_a_malformed_one(tmp_path):
    model = replay_net()
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    sc = LossScaler(init_scale=2.0 ** 9, growth_interval=7, min_scale=0.5)
    sc.bind(opt)
    sc._steps[...] = [0, 5, 3]
    path = ck.save_checkpoint(tmp_path / "c.npz", model, opt, loss_scaler=sc)
    loaded = ck.load_checkpoint(path)
    assert loaded.loss_scaler == sc.state_dict() == {
        "scale": 512.0, "good_steps": 5, "skipped_steps": 3, "init_scale": 512.0, "growth_interval": 7,
        "min_scale": 0.5, "max_scale": 2.0 ** 64}
    fresh = LossScaler()
    ck.load_into(loaded, replay_net(), None, fresh)
    assert fresh.state_dict() == sc.state_dict()          # the configuration comes with it
    assert ck.load_checkpoint(ck.save_checkpoint(tmp_path / "d.npz", model, opt)).loss_scaler is None
    for bad, message in (({"scale": 3.0}, "scale must be a power of two"),
                         ({"good_steps": 7}, "good_steps=7 < growth_interval=7"),
                         ({"skipped_steps": -1}, "skipped_steps must be a non-negative int"),
                         ({"scale": 0.25}, "does not fit its own rule")):
        loaded.loss_scaler = {**sc.state_dict(), **bad}
        with pytest.raises(ck.CheckpointError, match="loss scaler state does not fit: .*" + message):
            ck.load_into(loaded, replay_net(), None, LossScaler())
    loaded.loss_scaler = {"scale": 2.0}
    with pytest.raises(ck.CheckpointError, match="loss scaler state does not fit: .*has keys"):
        ck.load_into(loaded, replay_net(), None, LossScaler())


def _fp16_run(tmp_path, name, monkeypatch, **kw):
    from gpucnn.train import TrainConfig, loop, train

    # a scaler that moves within two short epochs: it starts too high (the first steps overflow fp16) and
    # grows every 3 good steps, overflowing again
    monkeypatch.setattr(loop, "LossScaler", lambda: LossScaler(init_scale=2.0 ** 24, growth_interval=3))
    cfg = TrainConfig(model="seed002_c1", epochs=2, batch_size=32, subset=256, test_subset=64, seed=3)
    log = []
    result = train(cfg, device="cpu", precision="fp16", out_dir=tmp_path / name, progress=False, log=log.append,
                   **kw)
    return result, log


def test_a_resumed_fp16_run_equals_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    whole, log = _fp16_run(tmp_path, "whole", monkeypatch)
    _fp16_run(tmp_path, "part", monkeypatch, stop_after=1)
    resumed, _ = _fp16_run(tmp_path, "resumed", monkeypatch, resume=tmp_path / "part")
    A, B = ck.load_checkpoint(whole.checkpoint), ck.load_checkpoint(resumed.checkpoint)
    for k in A.params:
        assert A.params[k].tobytes() == B.params[k].tobytes(), k
    for k in A.optimizer["slots"]:
        assert A.optimizer["slots"][k].tobytes() == B.optimizer["slots"][k].tobytes(), k
    assert A.loss_scaler == B.loss_scaler
    timing = ("images_per_sec", "train_seconds", "seconds")
    rows = [{k: v for k, v in r.items() if k not in timing} for r in whole.metrics]
    assert rows == [{k: v for k, v in r.items() if k not in timing} for r in resumed.metrics]
    # the scale moved both ways, so the resume restored a state that matters
    assert rows[0]["skipped_steps"] >= 2 and rows[1]["skipped_steps"] > rows[0]["skipped_steps"], rows
    assert A.loss_scaler["scale"] < 2.0 ** 24 and A.loss_scaler["growth_interval"] == 3
    assert "precision fp16 with dynamic loss scaling (scale 1.67772e+07)" in "\n".join(log)
    epoch1 = [s for s in log if s.startswith("epoch 1/2:")]
    assert epoch1[0].endswith(f", loss scale {rows[0]['loss_scale']:g} ({rows[0]['skipped_steps']} steps skipped "
                              "so far)"), epoch1


def test_resuming_in_fp16_from_an_fp32_checkpoint_starts_a_fresh_scale(tmp_path):
    from gpucnn.train import TrainConfig, train

    cfg = TrainConfig(model="seed002_c1", epochs=2, batch_size=64, subset=128, test_subset=64, seed=1)
    train(cfg, device="cpu", out_dir=tmp_path / "r", progress=False, log=None, stop_after=1)
    log = []
    result = train(cfg, device="cpu", precision="fp16", resume=tmp_path / "r", progress=False, log=log.append)
    assert any("holds no loss scale (its run did not use fp16): the loss scale starts at 65536" in s for s in log)
    assert ck.load_checkpoint(result.checkpoint).loss_scaler["scale"] == 65536.0
    log = []
    train(cfg.__class__(**{**cfg.__dict__, "epochs": 3}), device="cpu", resume=tmp_path / "r", progress=False,
          log=log.append)
    assert any("holds an fp16 run's loss scale, which precision fp32 does not use" in s for s in log)


def test_data_parallel_at_size_one_scales_like_a_plain_run(tmp_path):
    from gpucnn.train import TrainConfig, train

    cfg = TrainConfig(model="seed002_c1", epochs=1, batch_size=64, subset=128, test_subset=64, seed=1)
    plain = train(cfg, device="cpu", precision="fp16", out_dir=tmp_path / "a", progress=False, log=None)
    one = train(cfg, device="cpu", precision="fp16", out_dir=tmp_path / "b", progress=False, log=None,
                distributed=True)
    A, B = ck.load_checkpoint(plain.checkpoint), ck.load_checkpoint(one.checkpoint)
    assert all(A.params[k].tobytes() == B.params[k].tobytes() for k in A.params)
    assert A.loss_scaler == B.loss_scaler is not None


# -- the command ---------------------------------------------------------------------------------
def test_gpucnn_train_precision_fp16_scales_and_reports_it(tmp_path, capsys):
    from gpucnn import cli

    assert cli.main(["train", "--model", "seed002_c1", "--subset", "128", "--test-subset", "32", "--epochs", "1",
                     "--precision", "fp16", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "precision fp16 with dynamic loss scaling (scale 65536);" in out
    assert "loss scale 65536 (0 steps skipped so far)" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["precision"], r["loss_scale"], r["skipped_steps"]) for r in rows] == [("fp16", 65536.0, 0)]
    assert cli.main(["train", "--model", "seed002_c1", "--subset", "128", "--test-subset", "32", "--epochs", "1",
                     "--precision", "bf16", "--no-progress", "--out", str(tmp_path / "bf16")]) == 0
    row = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text())
    assert "loss_scale" not in row and "loss scale" not in capsys.readouterr().out


# -- watching a run whose steps are skipped ------------------------------------------------------
def test_the_watch_histograms_of_a_skipped_steps_gradients_do_not_break():
    """A skipped step's gradients hold Inf/NaN; a logged step's histogram of them must still be one
    (it used to cast NaN to a negative bucket index, and bincount refused it)."""
    from gpucnn.train.watch import HIST_BINS, _histogram

    v = np.array([1.0, -2.0, np.inf, np.nan, 3.0, -np.inf], np.float32)
    h = _histogram(np, v, HIST_BINS)
    assert h[3:].min() >= 0 and h[3:].sum() == v.size
    finite = np.array([0.5, -1.0, 2.0, 2.0], np.float32)          # finite values: the buckets as before
    want = np.minimum(((finite - finite.min()) * (HIST_BINS / 3.0)).astype(np.int32), HIST_BINS - 1)
    np.testing.assert_array_equal(_histogram(np, finite, HIST_BINS)[3:], np.bincount(want, minlength=HIST_BINS))


def test_a_watched_fp16_run_logs_its_skipped_steps(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    from gpucnn.train import RunOptions, TrainConfig, loop, read_metrics, train  # noqa: F401
    from gpucnn.train.watch import read_layer_stats  # noqa: F401

    monkeypatch.setattr(loop, "LossScaler", lambda: LossScaler(init_scale=2.0 ** 24, growth_interval=3))
    cfg = TrainConfig(model="seed002_c1", epochs=1, batch_size=32, subset=128, test_subset=32, seed=3)
    result = train(cfg, out_dir=tmp_path / "w", progress=False, log=None,
                   options=RunOptions(device="cpu", precision="fp16", log_every=1, tensorboard=True))
    skipped = result.metrics[-1]["skipped_steps"]
    rows = [json.loads(line) for line in (tmp_path / "w" / "layers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and skipped >= 1
    quiet = [r for r in rows if all(layer["update_norm"] == 0 for layer in r["layers"].values())]
    assert len(quiet) == skipped                                    # a skipped step updates nothing ...
    assert all(not np.isfinite(r["layers"]["0.W"]["grad_norm"]) for r in quiet)   # ... its gradients overflowed
