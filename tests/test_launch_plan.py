"""The train step as a recorded launch plan (gpucnn/train/plan.py), checked without a GPU.

As in test_cuda_graph.py, the CuPy stand-in (gpucnn/bench/standin.py) plays
CuPy and the CPU emulator (tests/cudasim) runs the kernels, so a planned run is
compared with an eager one bit for bit, and the plan's own checks are shown to
refuse the steps they exist to refuse: device work outside the launcher, launches
that change from step to step, host state a replay would skip.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpucnn as gc
from backends import emulator_builder, replay_data, replay_net, skip_without_emulator
from gpucnn import losses, optim
from gpucnn.bench import standin
from gpucnn.layers import AvgPool2D, MaxPool2D
from gpucnn.train.plan import StepPlan

pytestmark = pytest.mark.cudasim

AUG = {"seed": 7, "fill": -0.25, "flip": True}


_net, _data = replay_net, replay_data


def _sgd(m):
    return optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _train(make_opt, launch_plan, pool=MaxPool2D, augment=None, plant=None):
    """Two epochs of 23 samples in batches of 5 (4 full, 1 of 3) on the stand-in + emulator.

    Returns ``(synced (loss sum, count, seen), state dict, kernel launches, step count, plans)``.
    ``plant(trainer)`` may change the trainer before it runs (a planted fault).
    """
    skip_without_emulator()
    x, y, orders = _data()
    rec = standin.Recorder()
    with standin.installed(rec, builder=emulator_builder) as cp:
        model = _net(pool).to("cuda")
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False), make_opt(model),
                                   batch_size=5, schedule=lambda e, s: 0.1 / (1 + e + s), sync_every=3,
                                   augment=augment, launch_plan=launch_plan)
        if plant is not None:
            plant(trainer)
        dx, dy = cp.asarray(x), cp.asarray(y)
        seen = []
        for epoch, order in enumerate(orders):
            trainer.run_steps(dx, dy, cp.asarray(order), epoch, range(5), 5,
                              on_sync=lambda st, k: seen.append((st.loss_sum, st.correct, st.seen)))
        state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        launches = sum(e.kind == "kernel" for e in rec.events)
        plans = [p for p in trainer._graphs.values() if isinstance(p, StepPlan)]
        return seen, state, launches, trainer.optimizer.step_count, plans


def _same_training(a, b):
    assert a[0] == b[0]                                  # every synced loss sum and count, exactly
    assert a[3] == b[3] == 10
    for name, value in a[1].items():
        np.testing.assert_array_equal(b[1][name], value, err_msg=name)


@pytest.mark.parametrize("augment", [None, AUG], ids=["plain", "augmented"])
@pytest.mark.parametrize("make_opt", [_sgd, lambda m: optim.Adam(m, lr=0.01)], ids=["sgd", "adam"])
def test_planned_training_equals_eager_bit_for_bit(make_opt, augment):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a refused plan would warn
        eager = _train(make_opt, False, augment=augment)
        planned = _train(make_opt, True, augment=augment)
    _same_training(eager, planned)
    (plan,) = planned[4]
    assert plan.validated and len(plan.launches) >= 10
    # 8 full steps: 2 eager warm-ups, a recorded step, a validating step (a replay + an eager step),
    # then 4 replays: exactly one step's launches more than the eager run
    assert planned[2] == eager[2] + len(plan.launches)


def test_a_step_with_cupy_operations_is_refused_with_a_warning():
    """Average pooling runs as CuPy operations (it allocates): no plan, the same training."""
    eager = _train(_sgd, False, pool=AvgPool2D)
    with pytest.warns(RuntimeWarning, match=r"launch plan refused \(the step allocated device memory"):
        planned = _train(_sgd, True, pool=AvgPool2D)
    assert planned[4] == []
    _same_training(eager, planned)


def _after_forward_backward(trainer, extra):
    """Run ``extra(trainer)`` after every forward/backward of the trainer's steps."""
    real = trainer._forward_backward

    def wrapped(*a, **k):
        out = real(*a, **k)
        extra(trainer)
        return out

    trainer._forward_backward = wrapped


def _in_place_fault(trainer):
    """A device operation outside the launcher that allocates nothing: an in-place add to the gradients."""
    def add(t):
        t.optimizer.groups[0].grads += np.float32(0.5)
    _after_forward_backward(trainer, add)


def _allocating_op(trainer):
    """A device operation outside the launcher that allocates and changes nothing: a copy of the
    gradients each step (for a norm, a log); a replay would skip it, and on CuPy it allocates."""
    _after_forward_backward(trainer, lambda t: t.optimizer.groups[0].grads.copy())


def _changing_scalar(trainer):
    """SGD's momentum changed every step: the optimizer kernel's scalar arguments differ."""
    opt = trainer.optimizer
    real = opt.step

    def step(hyper=None):
        opt.momentum = 0.9 - 0.01 * opt.step_count
        return real(hyper)

    opt.step = step


def _host_draw(trainer):
    """A draw from gpucnn's counter stream on the host each step (a replay would not advance it)."""
    _after_forward_backward(trainer, lambda t: gc.random.uniform((1,)))


@pytest.mark.parametrize("plant, message", [
    (_in_place_fault, "did not reproduce the eager step bit for bit"),    # caught by the replay check
    (_allocating_op, r"the step allocated device memory \(1 allocations"),  # by the allocator, as on CuPy
    (_changing_scalar, "two consecutive steps launched different"),
    (_host_draw, "changed gpucnn's random stream"),
], ids=["device-work-outside-the-launcher", "allocating-op", "changing-scalar", "host-state"])
def test_a_step_the_plan_cannot_replay_is_refused_and_training_is_unchanged(plant, message):
    eager = _train(_sgd, False, plant=plant)
    with pytest.warns(RuntimeWarning, match=message):
        planned = _train(_sgd, True, plant=plant)
    _same_training(eager, planned)                         # the refused steps ran eagerly: nothing lost


def test_plan_is_on_by_default_and_numpy_steps_stay_eager():
    model = _net()
    trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), optim.SGD(model), batch_size=4)
    assert trainer.launch_plan
    x, y, orders = _data()
    trainer.run_steps(x, y, orders[0], 0, range(5), 5)
    assert trainer._graphs == {}                         # NumPy arrays: always eager


def test_label_checking_loss_is_not_planned_and_anomaly_detection_stops_replays(monkeypatch):
    """A loss that reads the labels on the host every step is left eager (no warning: the plan is
    only the default); turning anomaly detection on mid-run stops the replays at once."""
    skip_without_emulator()
    x, y, orders = _data()
    with standin.installed(standin.Recorder(), builder=emulator_builder) as cp, warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _net().to("cuda")
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=True), _sgd(model),
                                   batch_size=5, sync_every=3)
        trainer.run_steps(cp.asarray(x), cp.asarray(y), cp.asarray(orders[0]), 0, range(5), 5)
        assert not any(isinstance(p, StepPlan) for p in trainer._graphs.values())

        replays = []
        real_replay = StepPlan._replay
        monkeypatch.setattr(StepPlan, "_replay", lambda self: (replays.append(1), real_replay(self)))
        model = _net().to("cuda")
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False), _sgd(model),
                                   batch_size=5, sync_every=3)
        dx, dy = cp.asarray(x), cp.asarray(y)
        trainer.run_steps(dx, dy, cp.asarray(orders[0]), 0, range(5), 5)
        before = len(replays)
        assert before == 1                  # the validating replay (steps 2 and 3 record, 4 is partial)
        gc.debug.enable()
        try:
            trainer.run_steps(dx, dy, cp.asarray(orders[1]), 1, range(5), 5)
        finally:
            gc.debug.enable(False)
        assert len(replays) == before


def test_nvtx_ranges_are_replayed_in_their_place(monkeypatch):
    """With --nvtx a replayed step pushes and pops the same per-layer ranges as an eager step."""
    from gpucnn import nvtx

    def trace(launch_plan):
        events = []
        monkeypatch.setattr(nvtx, "_push", lambda name: events.append(("push", name)))
        monkeypatch.setattr(nvtx, "_pop", lambda: events.append(("pop",)))
        monkeypatch.setattr(nvtx, "_enabled", True)
        _train(_sgd, launch_plan)
        return [("push", "train_step") if e == ("push", "train_step (launch plan)") else e for e in events]

    def steps(events):
        """The events split into top-level ranges (one per train step or evaluation)."""
        groups, depth = [], 0
        for e in events:
            if depth == 0:
                groups.append([])
            groups[-1].append(e)
            depth += 1 if e[0] == "push" else -1
        return groups

    eager, planned = steps(trace(False)), steps(trace(True))
    assert len(eager) == len(planned) == 10 and ("push", "Conv2D+ReLU+MaxPool2D.forward") in eager[0]
    differ = [i for i, (a, b) in enumerate(zip(eager, planned)) if a != b]
    # only the validating step differs: a replay and the eager step, both with their ranges
    assert len(differ) == 1
    (i,) = differ
    inner = eager[i][1:-1]
    assert planned[i] == [eager[i][0]] + inner + inner + [eager[i][-1]]
