"""The train step as a CUDA graph (gpucnn/train/graph.py), checked without a GPU.

The CuPy stand-in (gpucnn/bench/standin.py) runs the capture: between
``begin_capture`` and ``end_capture`` the kernels gpucnn launches are recorded
into a graph, which ``launch`` replays; the kernels themselves run on the CPU
emulator (tests/cudasim).  So these tests check the graph's logic for real --
that a replayed step reads this step's indices and learning rate, writes the
same buffers an eager step does and reports its own loss -- by comparing a
graphed run with an eager one bit for bit, and show that the capture checks
refuse the steps they exist to refuse: device work the graph misses, launches
that change from step to step, host state a replay would skip.  What they
cannot check is CUDA's own capture (that needs a GPU: tests/test_gpu.py).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import gpucnn as gc
from backends import emulator_builder, replay_data, replay_net, skip_without_emulator
from gpucnn import losses, optim
from gpucnn.bench import standin
from gpucnn.layers import AvgPool2D, MaxPool2D
from gpucnn.train.graph import GraphedStep

pytestmark = pytest.mark.cudasim

AUG = {"seed": 7, "fill": -0.25, "flip": True}

_net, _data = replay_net, replay_data


def _sgd(m):
    return optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _adam(m):
    return optim.Adam(m, lr=0.01)


def _train(make_opt, cuda_graph, pool=MaxPool2D, loss=None, steps=(0, 5), lr=0.1, augment=None, plant=None):
    """Two epochs of 23 samples in batches of 5 (4 full, 1 of 3) on the stand-in + emulator.

    Returns ``(synced (loss sum, count, seen), state dict, graph launches, step count, validated graphs)``.
    ``plant(trainer)`` may change the trainer before it runs (a planted fault).
    """
    skip_without_emulator()
    x, y, orders = _data()
    rec = standin.Recorder()
    with standin.installed(rec, builder=emulator_builder) as cp:
        model = _net(pool).to("cuda")
        trainer = gc.train.Trainer(model, loss or losses.SoftmaxCrossEntropy(check_labels=False), make_opt(model),
                                   batch_size=5, schedule=lambda e, s: lr / (1 + e + s), sync_every=3,
                                   cuda_graph=cuda_graph, augment=augment)
        if plant is not None:
            plant(trainer)
        dx, dy = cp.asarray(x), cp.asarray(y)
        seen = []
        for epoch, order in enumerate(orders):
            trainer.run_steps(dx, dy, cp.asarray(order), epoch, range(*steps), 5,
                              on_sync=lambda st, k: seen.append((st.loss_sum, st.correct, st.seen)))
        state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        graphs = sum(e.kind == "graph" for e in rec.events)
        validated = [g for g in trainer._graphs.values() if isinstance(g, GraphedStep) and g.validated]
        return seen, state, graphs, trainer.optimizer.step_count, validated


def _same_training(a, b):
    assert a[0] == b[0]                                  # every synced loss sum and count, exactly
    assert a[3] == b[3]                                  # the step count advances on replays too (Adam)
    for name, value in a[1].items():
        np.testing.assert_array_equal(b[1][name], value, err_msg=name)


@pytest.mark.parametrize("augment", [None, AUG], ids=["plain", "augmented"])
@pytest.mark.parametrize("make_opt", [_sgd, _adam], ids=["sgd", "adam"])
def test_graphed_training_equals_eager_bit_for_bit(make_opt, augment):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a refused graph would warn
        eager = _train(make_opt, False, augment=augment)
        graphed = _train(make_opt, True, augment=augment)
    assert eager[2] == 0 and eager[3] == 10
    _same_training(eager, graphed)
    assert len(graphed[4]) == 1
    # 8 full steps over 2 epochs: 2 eager warm-ups, a captured step and a validating step (both
    # eager; the second replays both captures once), then 4 replays; the 2 partial batches run eagerly
    assert graphed[2] == 2 + 4


def test_augmented_graphs_read_each_steps_key():
    """With augmentation the graph reads each step's key from its fixed buffer: a replay shifts
    and mirrors its batch as the eager step would (a stale key would repeat the first batch's draws)."""
    graphed = _train(_sgd, True, augment=AUG)
    plain = _train(_sgd, True)
    assert graphed[2] == plain[2] == 6 and graphed[0] != plain[0]


def test_the_graph_is_on_by_default_and_numpy_steps_stay_eager():
    model = _net()
    trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), optim.SGD(model), batch_size=4)
    assert trainer.cuda_graph
    x, y, orders = _data()
    trainer.run_steps(x, y, orders[0], 0, range(5), 5)
    assert trainer._graphs == {}                         # NumPy arrays: always eager
    assert trainer.why_eager(x, 4) == "the CPU: NumPy steps are eager"


def test_a_step_that_cannot_be_captured_falls_back_with_a_warning():
    """Average pooling runs as CuPy operations: the capture is refused, training goes on eagerly."""
    eager = _train(_sgd, False, pool=AvgPool2D)
    with pytest.warns(RuntimeWarning, match=r"CUDA graph not used \(the step allocated .*; training continues with eager steps"):
        graphed = _train(_sgd, True, pool=AvgPool2D)
    assert graphed[2] == 0
    _same_training(eager, graphed)


def test_an_allocating_step_is_refused(monkeypatch):
    """A step that allocates device memory while being captured is not graphed (its memory would be recycled)."""
    from gpucnn.functional import workspace

    real = workspace.Workspace.get

    def leaky(self, role, shape, dtype, xp=np, *, fill=None):
        if role == "k.y" and getattr(standin._state, "capture", None) is not None:
            return xp.empty(shape, dtype)       # a fresh array in the middle of the step
        return real(self, role, shape, dtype, xp, fill=fill)

    monkeypatch.setattr(workspace.Workspace, "get", leaky)
    with pytest.warns(RuntimeWarning, match="allocated .* bytes of device memory while being captured"):
        graphed = _train(_sgd, True, steps=(0, 4))
    assert graphed[2] == 0


# -- the capture checks: planted faults ---------------------------------------------------------


def _after_forward_backward(trainer, extra):
    """Run ``extra(trainer)`` after every forward/backward of the trainer's steps."""
    real = trainer._forward_backward

    def wrapped(*a, **k):
        out = real(*a, **k)
        extra(trainer)
        return out

    trainer._forward_backward = wrapped


def _in_place_fault(trainer):
    """A device operation outside the launcher: an in-place add to the gradients (the stand-in
    cannot capture a CuPy operation; on CUDA it would be captured and replayed)."""
    def add(t):
        t.optimizer.groups[0].grads += np.float32(0.5)
    _after_forward_backward(trainer, add)


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
    (_in_place_fault, r"capture failed .*a CuPy operation"),
    (_changing_scalar, "two consecutive steps captured different graphs"),
    (_host_draw, "changed gpucnn's random stream"),
], ids=["device-work-outside-the-launcher", "changing-scalar", "host-state"])
def test_a_step_the_graph_cannot_replay_is_refused_and_training_is_unchanged(plant, message):
    eager = _train(_sgd, False, plant=plant)
    with pytest.warns(RuntimeWarning, match=message):
        graphed = _train(_sgd, True, plant=plant)
    assert graphed[4] == []
    _same_training(eager, graphed)                        # the refused steps ran eagerly: nothing lost


def test_a_graph_that_misses_device_work_is_refused(monkeypatch):
    """Planted fault: every capture loses its last node (the optimizer's update).  Both captures
    agree with each other, so only the comparison with the eager step catches it."""
    from gpucnn.train import graph as graph_mod

    real = graph_mod.capture

    def lossy(trainer, fixed, x, y):
        graph, pins = real(trainer, fixed, x, y)
        graph.launches = graph.launches[:-1]
        return graph, pins

    monkeypatch.setattr(graph_mod, "capture", lossy)
    eager = _train(_sgd, False)
    with pytest.warns(RuntimeWarning, match="did not reproduce the eager step bit for bit"):
        graphed = _train(_sgd, True)
    assert graphed[4] == []
    _same_training(eager, graphed)


def test_steps_that_stay_eager_say_why_without_a_warning(monkeypatch):
    """MSE, a label-checking loss, anomaly detection (turned on mid-run it stops the replays at
    once), the last partial batch and several ranks run eagerly, with a reason and no warning."""
    skip_without_emulator()
    x, y, orders = _data()
    with standin.installed(standin.Recorder(), builder=emulator_builder) as cp, warnings.catch_warnings():
        warnings.simplefilter("error")
        dx, dy = cp.asarray(x), cp.asarray(y)
        for loss, why in [(losses.MSE(), "only softmax cross-entropy steps are captured, not MSE"),
                          (losses.SoftmaxCrossEntropy(check_labels=True), "checks the labels on the host")]:
            model = _net().to("cuda")
            trainer = gc.train.Trainer(model, loss, optim.SGD(model, lr=1e-3), batch_size=5, sync_every=3)
            trainer.run_steps(dx, dy, cp.asarray(orders[0]), 0, range(5), 5)
            assert trainer._graphs == {}
            assert why in trainer.why_eager(dx, 5, replayable_loss=not isinstance(loss, losses.MSE))

        replays = []
        real_launch = standin._Graph.launch
        monkeypatch.setattr(standin._Graph, "launch", lambda self, stream=None: (replays.append(1),
                                                                                  real_launch(self, stream)))
        model = _net().to("cuda")
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False), _sgd(model),
                                   batch_size=5, sync_every=3)
        assert "last, smaller batch" in trainer.why_eager(dx, 3)
        trainer.run_steps(dx, dy, cp.asarray(orders[0]), 0, range(5), 5)
        assert len(replays) == 2            # the validating step's two replays (steps 0-1 warm up, 4 is partial)
        gc.debug.enable()
        try:
            assert "anomaly detection" in trainer.why_eager(dx, 5)
            trainer.run_steps(dx, dy, cp.asarray(orders[1]), 1, range(5), 5)
        finally:
            gc.debug.enable(False)
        assert len(replays) == 2

    class TwoRanks:
        size, rank = 2, 0

    trainer = gc.train.Trainer(_net(), losses.SoftmaxCrossEntropy(), optim.SGD(_net()), batch_size=5,
                               comm=TwoRanks())
    with standin.installed(standin.Recorder()) as cp:
        assert "several ranks" in trainer.why_eager(cp.asarray(x), 5)


def test_graphed_training_with_the_sync_check_on(monkeypatch):
    """``GPUCNN_CUDA_SYNC_CHECK=1`` syncs after every eager launch but never inside a capture:
    a sync there invalidates the graph (the stand-in refuses such a capture, as CUDA does)."""
    from gpucnn.cuda import loader

    eager = _train(_sgd, False)
    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    graphed = _train(_sgd, True)
    assert graphed[2] == 6 and graphed[0] == eager[0]


def test_a_sync_check_that_ignores_the_capture_is_refused(monkeypatch):
    """Planted fault: the loader's sync check no longer skips a capturing stream -- it syncs inside
    the capture, which CUDA refuses; the stand-in fails the capture the same way."""
    from gpucnn.cuda import loader

    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    monkeypatch.setattr(standin._Stream, "is_capturing", lambda self: False)
    with pytest.warns(RuntimeWarning, match=r"capture failed .*host synchronisation \(stream.synchronize\)"):
        graphed = _train(_sgd, True, steps=(0, 4))
    assert graphed[2] == 0


def test_a_capture_on_the_current_stream_is_refused(monkeypatch):
    """Planted fault: the step captured on the current stream -- the null stream, on which CuPy
    refuses to begin a capture -- instead of a stream of its own."""
    monkeypatch.setattr(standin.standin.cuda, "Stream", lambda **kw: standin.standin.cuda.get_current_stream())
    refused = r"capture failed \(RuntimeError: cannot capture on the default \(legacy\) stream\)"
    with pytest.warns(RuntimeWarning, match=refused):
        graphed = _train(_sgd, True, steps=(0, 4))
    assert graphed[2] == 0


def test_the_stand_in_refuses_a_sync_inside_a_capture():
    """The planted fault behind the test above: a stream synchronize during capture."""
    with standin.installed(standin.Recorder()) as cp:
        stream = cp.cuda.Stream()
        stream.begin_capture()
        assert stream.is_capturing()
        stream.synchronize()
        with pytest.raises(RuntimeError, match="synchronize"):
            stream.end_capture()
        assert not stream.is_capturing()


def test_train_keeps_a_uint8_training_set_on_the_device(tmp_path, monkeypatch):
    """`train` on a GPU keeps the raw uint8 training set on the device and makes every batch with
    gather_batch_augment_u8 (captured in the CUDA graph too); the run is, bit for bit, the run on
    the float32 set normalised up front (GPUCNN_DEVICE_DATA=0)."""
    from gpucnn.cuda import loader
    from gpucnn.data import Dataset
    from gpucnn.train import TrainConfig, train

    skip_without_emulator()
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (24, 3, 12, 12), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    # 4 full steps: 2 eager warm-ups, a captured step and a validating one (the graph path too)
    ds = Dataset(name="folder", classes=["a", "b", "c"], train_images=raw[:20], train_labels=labels[:20],
                 test_images=raw[20:], test_labels=labels[20:], mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    cfg = TrainConfig(model="lenet5", dataset="folder", epochs=1, batch_size=5, augment=True, flip=True)

    def run(device_data):
        monkeypatch.setenv("GPUCNN_DEVICE_DATA", device_data)
        launched = []
        real = loader.launch
        monkeypatch.setattr(loader, "launch", lambda k, *a, **kw: (launched.append(k), real(k, *a, **kw)))
        gc.seed(0)
        net = gc.layers.Sequential(gc.layers.Conv2D(3, 2, 3), gc.layers.ReLU(), gc.layers.Flatten(),
                                   gc.layers.Dense(2 * 10 * 10, 3))      # small: the emulator runs every thread
        with standin.installed(standin.Recorder(), builder=emulator_builder):
            train(cfg, model=net, data=ds, device="cuda", out_dir=tmp_path / device_data, progress=False,
                        log=None)
        monkeypatch.setattr(loader, "launch", real)
        return [k for k in launched if k.startswith("gather")]

    raw_gathers = run("1")
    float_gathers = run("0")
    assert set(raw_gathers) == {"gather_batch_augment_u8"} and set(float_gathers) == {"gather_batch_augment"}
    a = [json.loads(line) for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert a[0][key] == b[0][key], key
    wa = gc.checkpoint.load_checkpoint(tmp_path / "1").params
    wb = gc.checkpoint.load_checkpoint(tmp_path / "0").params
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
