"""The train step as a CUDA graph (gpucnn/train/graph.py), checked without a GPU.

The CuPy stand-in (gpucnn/bench/standin.py) runs the capture: between
``begin_capture`` and ``end_capture`` the kernels gpucnn launches are recorded
into a graph, which ``launch`` replays; the kernels themselves run on the CPU
emulator (tests/cudasim).  So these tests check the graph's logic for real --
that a replayed step reads this step's indices and learning rate, writes the
same buffers an eager step does and reports its own loss -- by comparing a
graphed run with an eager one bit for bit.  What they cannot check is CUDA's
own capture (that needs a GPU: tests/gpu).
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn as gc
from backends import emulator_builder, replay_data, replay_net, skip_without_emulator
from gpucnn import losses, optim
from gpucnn.bench import standin
from gpucnn.layers import AvgPool2D, MaxPool2D

pytestmark = pytest.mark.cudasim


_net, _data = replay_net, replay_data


def _train(make_opt, cuda_graph, pool=MaxPool2D, loss=None, steps=(0, 5), lr=0.1, augment=None):
    """Two epochs of 23 samples in batches of 5 (4 full, 1 of 3) on the stand-in + emulator."""
    skip_without_emulator()
    x, y, orders = _data()
    rec = standin.Recorder()
    with standin.installed(rec, builder=emulator_builder) as cp:
        model = _net(pool).to("cuda")
        trainer = gc.train.Trainer(model, loss or losses.SoftmaxCrossEntropy(check_labels=False), make_opt(model),
                                   batch_size=5, schedule=lambda e, s: lr / (1 + e + s), sync_every=3,
                                   cuda_graph=cuda_graph, augment=augment, launch_plan=False)
        dx, dy = cp.asarray(x), cp.asarray(y)
        seen = []
        for epoch, order in enumerate(orders):
            trainer.run_steps(dx, dy, cp.asarray(order), epoch, range(*steps), 5,
                              on_sync=lambda st, k: seen.append((st.loss_sum, st.correct, st.seen)))
        state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        graphs = sum(e.kind == "graph" for e in rec.events)
        return seen, state, graphs, trainer.optimizer.step_count


OPTIMIZERS = [pytest.param(lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), id="sgd"),
              pytest.param(lambda m: optim.Adam(m, lr=0.01), id="adam")]


@pytest.mark.parametrize("make_opt", OPTIMIZERS)
def test_graphed_training_equals_eager_bit_for_bit(make_opt):
    eager = _train(make_opt, False)
    graphed = _train(make_opt, True)
    assert eager[2] == 0
    # 8 full steps over 2 epochs: 2 eager warm-up steps, then 6 replays; the 2 partial batches run eagerly
    assert graphed[2] == 6
    assert graphed[0] == eager[0]                       # every synced loss sum and count, exactly
    assert graphed[3] == eager[3] == 10                 # the step count advances on replays too (Adam)
    for name, value in eager[1].items():
        np.testing.assert_array_equal(graphed[1][name], value, err_msg=name)


def test_augmented_graphed_training_equals_eager_bit_for_bit():
    """With augmentation the graph reads each step's key from its fixed buffer: a replay shifts
    and mirrors its batch as the eager step would (a stale key would repeat the first batch's draws)."""
    make = OPTIMIZERS[0].values[0]
    aug = {"seed": 7, "fill": -0.25, "flip": True}
    eager = _train(make, False, augment=aug)
    graphed = _train(make, True, augment=aug)
    plain = _train(make, False)
    assert graphed[2] == 6 and graphed[0] == eager[0] and eager[0] != plain[0]
    for name, value in eager[1].items():
        np.testing.assert_array_equal(graphed[1][name], value, err_msg=name)


def test_a_step_that_cannot_be_captured_falls_back_with_a_warning():
    """Average pooling runs as CuPy operations: the capture is refused, training goes on eagerly."""
    make = OPTIMIZERS[0].values[0]
    eager = _train(make, False, pool=AvgPool2D)
    with pytest.warns(RuntimeWarning, match="--cuda-graph: capture failed .* training continues without"):
        graphed = _train(make, True, pool=AvgPool2D)
    assert graphed[2] == 0 and graphed[0] == eager[0]
    for name, value in eager[1].items():
        np.testing.assert_array_equal(graphed[1][name], value, err_msg=name)


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
        graphed = _train(OPTIMIZERS[0].values[0], True, steps=(0, 4))
    assert graphed[2] == 0


def test_mse_steps_are_not_captured():
    with pytest.warns(RuntimeWarning, match=r"the step is not captured \(only softmax cross-entropy steps are replayed, not MSE\)"):
        graphed = _train(OPTIMIZERS[0].values[0], True, loss=losses.MSE(), steps=(0, 4), lr=1e-3)
    assert graphed[2] == 0


def test_cuda_graph_with_several_ranks_is_refused():
    class TwoRanks:
        size, rank = 2, 0

    model = _net()
    with pytest.raises(ValueError, match="cuda_graph=True is not supported for data-parallel"):
        gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), optim.SGD(model), batch_size=4, comm=TwoRanks(),
                         cuda_graph=True)


def test_graphed_training_with_the_sync_check_on(monkeypatch):
    """``GPUCNN_CUDA_SYNC_CHECK=1`` syncs after every eager launch but never inside a capture:
    a sync there invalidates the graph (the stand-in refuses such a capture, as CUDA does)."""
    from gpucnn.cuda import loader

    make_opt = OPTIMIZERS[0].values[0]
    eager = _train(make_opt, False)
    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    graphed = _train(make_opt, True)
    assert graphed[2] == 6 and graphed[0] == eager[0]


def test_a_sync_check_that_ignores_the_capture_is_refused(monkeypatch):
    """Planted fault: the loader's sync check no longer skips a capturing stream -- it syncs inside
    the capture, which CUDA refuses; the stand-in fails the capture the same way."""
    from gpucnn.cuda import loader

    monkeypatch.setenv(loader.SYNC_CHECK_ENV, "1")
    monkeypatch.setattr(standin._Stream, "is_capturing", lambda self: False)
    with pytest.warns(RuntimeWarning, match=r"capture failed .*host synchronisation \(stream.synchronize\)"):
        graphed = _train(OPTIMIZERS[0].values[0], True, steps=(0, 4))
    assert graphed[2] == 0


def test_a_capture_on_the_current_stream_is_refused(monkeypatch):
    """Planted fault: the step captured on the current stream -- the null stream, on which CuPy
    refuses to begin a capture -- instead of a stream of its own."""
    monkeypatch.setattr(standin.standin.cuda, "Stream", lambda **kw: standin.standin.cuda.get_current_stream())
    refused = r"capture failed \(RuntimeError: cannot capture on the default \(legacy\) stream\)"
    with pytest.warns(RuntimeWarning, match=refused):
        graphed = _train(OPTIMIZERS[0].values[0], True, steps=(0, 4))
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
