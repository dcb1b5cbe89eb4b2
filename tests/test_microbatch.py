"""A NumPy step's batch in micro-batches (gpucnn/train/workers.py): the same gradient as one
pass, the same bits for any thread count, and whole batches wherever samples meet."""
from __future__ import annotations

import signal

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import debug, layers, losses, models, optim
from gpucnn import threads
from gpucnn.functional.layout import to_internal
from gpucnn.train import workers
from gpucnn.train.trainer import forward_backward


@pytest.fixture(autouse=True)
def planted_layers_split(monkeypatch):
    """The layers below that plant failures in workers compute like a ReLU: let the split take them."""
    never_mixing = workers._never_mixing
    monkeypatch.setattr(workers, "_never_mixing", lambda: never_mixing() + (_FailsInWorkers, _DiesInWorkers))


@pytest.fixture
def restore_threads(monkeypatch):
    before = threads.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)   # 2 threads on any box (counts are capped at the cores)
    yield
    threads.set_num_threads(before)


def test_micro_bounds_cover_the_batch_in_pieces_of_at_most_64():
    assert workers.micro_bounds(31) == [(0, 31)]
    assert workers.micro_bounds(32) == [(0, 16), (16, 32)]
    assert workers.micro_bounds(64) == [(0, 32), (32, 64)]
    assert workers.micro_bounds(65) == [(0, 33), (33, 65)]
    assert workers.micro_bounds(256) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    for n in (1, 63, 129, 200, 1000):
        bounds = workers.micro_bounds(n)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b <= a + workers.MICRO_BATCH for a, b in bounds)
        assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
        assert len(bounds) == (1 if n < 32 else max(2, -(-n // workers.MICRO_BATCH)))


class _CoupledReLU(layers.ReLU):
    """A subclass overriding forward may couple the samples: it runs its own passes, never split."""

    def forward(self, x):
        return super().forward(x - x.mean(axis=0))


@pytest.mark.parametrize("net, reason", [
    (lambda: models.build("lenet5"), None),
    (lambda: models.build("zhang2016"), None),
    (lambda: models.build("resnet_mini"), "BatchNorm2d may mix the samples of a batch"),
    (lambda: layers.Sequential(layers.Flatten(), layers.Dense(784, 10), layers.Dropout(0.5)),
     "Dropout may mix the samples of a batch"),
    (lambda: layers.Sequential(layers.Flatten(), layers.Dense(784, 10), _CoupledReLU()),
     "_CoupledReLU runs its own forward/backward"),
    (lambda: layers.Sequential(layers.Flatten(), layers.Dense(784, 10), layers.Softmax()),
     "Softmax may mix the samples of a batch"),
])
def test_which_models_split(net, reason):
    assert workers.why_whole(net(), losses.SoftmaxCrossEntropy()) == reason


def test_anomaly_detection_keeps_the_batch_whole():
    with debug.detect_anomaly():
        assert workers.why_whole(models.build("lenet5"), losses.SoftmaxCrossEntropy()) == \
            "anomaly detection is on"


def _residual_net(dtype):
    return layers.Sequential(
        layers.Conv2D(1, 4, 3, padding=1, dtype=dtype), layers.ReLU(),
        layers.Residual(layers.Sequential(layers.Conv2D(4, 4, 3, padding=1, dtype=dtype), layers.ReLU(),
                                          layers.Conv2D(4, 4, 3, padding=1, dtype=dtype))),
        layers.Residual(layers.Sequential(layers.Conv2D(4, 8, 3, stride=2, padding=1, dtype=dtype)),
                        layers.Conv2D(4, 8, 1, stride=2, dtype=dtype)),
        layers.ReLU(), layers.GlobalAvgPool2D(), layers.Dense(8, 10, dtype=dtype))


def _build(name, dtype):
    if name == "residual":
        return _residual_net(dtype), losses.SoftmaxCrossEntropy()
    return models.build(name, dtype=dtype), models.make_loss(name)


def _batch(n, dtype, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(dtype), rng.integers(0, 10, n)


@pytest.mark.parametrize("name", ["lenet5", "zhang2016", "residual"])
@pytest.mark.parametrize("n", [200, 256])
def test_micro_batches_give_the_one_pass_gradient(name, n, restore_threads):
    """float64: the micro-batch step's loss, count and every gradient equal one whole-batch pass's
    (a micro-batch scaled by anything but n_m / N, a missing or doubled micro-batch, or one
    gradient left out of the sum fails this)."""
    threads.set_num_threads(2)
    gc.seed(0)
    model, loss = _build(name, np.float64)
    trainer = gc.train.Trainer(model, loss, optim.SGD(model, lr=0.1, momentum=0.9), batch_size=n)
    x, y = _batch(n, np.float64)
    xi = to_internal(x)
    one_value, one_correct = forward_backward(model, loss, xi, y, 0.5)
    one = [g.copy() for g in model.gradients()]
    trainer._runner = workers.MicroBatches(model, loss, trainer.optimizer, forward_backward)
    assert trainer._runner.usable(xi)
    for g in model.gradients():
        g.fill(np.nan)                      # the micro path must overwrite every gradient
    value, correct = trainer._forward_backward(xi, y, 0.5)
    assert value.dtype == np.float64 and value.shape == ()
    np.testing.assert_allclose(float(value), float(one_value), rtol=1e-13)
    assert int(correct) == int(one_correct)
    for (pname, _, _), g, ref in zip(model.named_parameters(), model.gradients(), one):
        np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-14, err_msg=pname)


def _train(name, n_threads, batch=200, steps=3):
    threads.set_num_threads(n_threads)
    gc.seed(0)
    model, loss = _build(name, np.float32)
    trainer = gc.train.Trainer(model, loss, optim.SGD(model, lr=0.05, momentum=0.9), batch_size=batch)
    x, y = _batch(batch * steps, np.float32, seed=1)
    seen = []
    trainer.run_steps(x, y, np.arange(batch * steps), 0, range(steps), steps,
                      on_sync=lambda st, k: seen.append((st.loss_sum, st.correct)))
    return seen, model.state_dict()


@pytest.mark.parametrize("name", ["lenet5", "residual"])
def test_micro_batch_training_is_the_same_bits_for_any_thread_count(name, restore_threads):
    one = _train(name, 1)
    for n in (2, 3, 5):
        other = _train(name, n)
        assert other[0] == one[0], f"losses differ with {n} threads"
        for key, value in one[1].items():
            np.testing.assert_array_equal(other[1][key], value, err_msg=f"{key} with {n} threads")


def test_replicas_follow_the_optimizer_and_the_train_flag(restore_threads):
    """The replicas read the parameters the optimizer updates (three float64 steps track whole-batch
    steps) and take the model's train/eval flag."""
    threads.set_num_threads(2)
    x, y = _batch(3 * 130, np.float64, seed=5)
    states = []
    for split in (True, False):
        gc.seed(0)
        model = models.build("lenet5", dtype=np.float64)
        trainer = gc.train.Trainer(model, models.make_loss("lenet5"), optim.SGD(model, lr=0.1, momentum=0.9),
                                   batch_size=130)
        if not split:
            trainer._runner = workers.MicroBatches(model, trainer.loss, trainer.optimizer, forward_backward)
            trainer._runner.usable = lambda x: False
        trainer.run_steps(x, y, np.arange(3 * 130), 0, range(3), 3)
        states.append(model.state_dict())
        if split:
            micro = trainer._runner
            reps = [micro.forked.local] if micro.forked is not None else micro._replicas
            assert reps and all(r.model.training for r in reps)
            for r in reps:
                for (name, layer, key), (_, rlayer, rkey) in zip(model.named_parameters(),
                                                                 r.model.named_parameters()):
                    assert rlayer.params[rkey] is layer.params[key], name
                    assert rlayer.grads[rkey] is not layer.grads[key], name
    for key, value in states[1].items():
        np.testing.assert_allclose(states[0][key], value, rtol=1e-9, atol=1e-12, err_msg=key)


def test_models_that_mix_samples_run_whole(restore_threads):
    threads.set_num_threads(2)
    gc.seed(0)
    model = models.build("resnet_mini")
    trainer = gc.train.Trainer(model, models.make_loss("resnet_mini"), optim.SGD(model, lr=0.1),
                               batch_size=130)
    x, y = _batch(130, np.float32)
    trainer.step(x, y)
    assert trainer._runner is not None and not trainer._runner._replicas


def test_describe_says_how_a_step_runs(restore_threads, monkeypatch):
    threads.set_num_threads(2)
    xent = losses.SoftmaxCrossEntropy()
    monkeypatch.setattr(workers, "PROCESSES", False)
    assert workers.describe(models.build("lenet5"), xent, 256) == "4 micro-batches of <= 64 samples over 2 thread(s)"
    assert workers.describe(models.build("lenet5"), xent, 64) == "2 micro-batches of <= 64 samples over 2 thread(s)"
    assert workers.describe(models.build("lenet5"), xent, 31) == \
        "whole batch (< 32 samples), its ops over 2 thread(s)"
    monkeypatch.setattr(workers, "PROCESSES", True)
    assert workers.describe(models.build("lenet5"), xent, 64) == \
        "2 micro-batches of <= 64 samples over 2 process(es), forked"
    assert workers.describe(models.build("resnet_mini"), xent, 256) == \
        "whole batch, its ops over 2 thread(s) (BatchNorm2d may mix the samples of a batch)"


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
def test_forked_workers_give_the_threads_bits_and_stop_when_closed(restore_threads, monkeypatch):
    runs = {}
    for processes in (False, True):
        monkeypatch.setattr(workers, "PROCESSES", processes)
        runs[processes] = _train("lenet5", 3)
    assert runs[True][0] == runs[False][0]
    for key, value in runs[False][1].items():
        np.testing.assert_array_equal(runs[True][1][key], value, err_msg=key)
    threads.set_num_threads(2)
    gc.seed(0)
    model = models.build("lenet5")
    trainer = gc.train.Trainer(model, models.make_loss("lenet5"), optim.SGD(model, lr=0.1), batch_size=130)
    x, y = _batch(130, np.float32)
    trainer.step(x, y)
    runner = trainer._runner.forked
    assert runner is not None and all(p.is_alive() for p in runner.procs)
    for _, layer, key in model.named_parameters():
        assert threads.is_shared(layer.params[key])     # what the workers read, from the start
    runner.close()
    assert not any(p.is_alive() for p in runner.procs)


class _FailsInWorkers(layers.ReLU):
    parent = None

    def _forward(self, x, epilogue=None):
        import os
        if os.getpid() != self.parent:
            raise ValueError("planted failure in a worker")
        return super()._forward(x, epilogue)


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
def test_a_failing_worker_raises_its_traceback_in_the_step(restore_threads):
    import os
    threads.set_num_threads(2)
    model = layers.Sequential(layers.Flatten(), layers.Dense(784, 10), _FailsInWorkers())
    model.layers[2].parent = os.getpid()
    trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1), batch_size=130)
    x, y = _batch(130, np.float32)
    # the worker's exception class, with where it was raised and its traceback
    with pytest.raises(ValueError, match="planted failure in a worker\n\\(raised in micro-batch worker 1 of 1; "
                                         "its traceback:\\)\n(.|\n)*_forward"):
        trainer.step(x, y)
    trainer._runner.close()


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
def test_a_reply_to_an_abandoned_step_is_not_taken_for_the_next(restore_threads):
    """A step the parent stopped waiting for (Ctrl-C in a notebook) leaves a worker reply in the pipe:
    the next step must wait for its own reply, not sum buffers the worker is still writing."""
    threads.set_num_threads(2)
    gc.seed(0)
    model = models.build("lenet5")
    trainer = gc.train.Trainer(model, models.make_loss("lenet5"), optim.SGD(model, lr=0.1), batch_size=256)
    x, y = _batch(256, np.float32)
    xi = to_internal(x)
    trainer._forward_backward(xi, y, 1.0)
    first = [g.copy() for g in model.gradients()]
    runner = trainer._runner.forked
    runner._seq += 1                                 # a step whose replies nobody reads, at another scale
    np.copyto(runner.x[..., :256], xi)
    runner.y[:256] = y
    for conn in runner.conns:
        conn.send_bytes(workers._COMMAND.pack(runner._seq, 256, 1000.0, True, 0))
    trainer._forward_backward(xi, y, 1.0)
    for (name, _, _), g, ref in zip(model.named_parameters(), model.gradients(), first):
        np.testing.assert_array_equal(g, ref, err_msg=name)
    runner.close()


class _SummedXent(losses.SoftmaxCrossEntropy):
    """A subclass may weigh its samples another way: only the built-in losses are split."""


def test_a_loss_subclass_keeps_the_batch_whole():
    assert workers.why_whole(models.build("lenet5"), _SummedXent()) == \
        "the loss _SummedXent is not a built-in per-sample mean"


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
def test_workers_follow_a_new_optimizer_a_smaller_batch_and_a_dead_worker(restore_threads):
    """The parameter arrays handed out before the first step are the ones trained; a new optimizer
    means new workers; a smaller batch reuses them; a killed worker costs a warning and the step runs
    again on new workers -- every step giving the whole-batch gradient (float64)."""
    threads.set_num_threads(2)
    gc.seed(0)
    model = models.build("lenet5", dtype=np.float64)
    loss = models.make_loss("lenet5")
    trainer = gc.train.Trainer(model, loss, optim.SGD(model, lr=0.1, momentum=0.9), batch_size=200)
    W, W0 = model[0].params["W"], model[0].params["W"].copy()    # held from the optimizer's creation on
    x, y = _batch(200, np.float64)

    def check(n):
        xi = to_internal(x[:n])
        trainer._forward_backward(xi, y[:n], 1.0)
        got = [g.copy() for g in model.gradients()]
        forward_backward(model, loss, xi, y[:n], 1.0)
        for (name, _, _), g, ref in zip(model.named_parameters(), got, model.gradients()):
            np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-14, err_msg=f"{name}, batch {n}")

    trainer.step(x, y)
    assert model[0].params["W"] is W and not np.array_equal(W, W0)    # the same array, trained
    first = trainer._runner.forked
    check(200)
    check(100)                                              # fewer samples: the same workers
    assert trainer._runner.forked is first
    trainer.optimizer = optim.Adam(model, lr=1e-3)           # new flat buffers: new workers
    trainer.step(x, y)
    assert trainer._runner.forked is not first and first.closed
    check(200)
    runner = trainer._runner.forked
    runner.procs[0].kill()
    runner.procs[0].join()
    with pytest.warns(RuntimeWarning, match="micro-batch worker 1 of 1 .* ended in the middle of a step "
                                            r"\(killed by SIGKILL.*\); the step runs again on new workers"):
        trainer.step(x, y)
    assert trainer._runner.forked is not runner              # forked again
    check(200)
    trainer._runner.close()


class _DiesInWorkers(layers.ReLU):
    """Kills the worker process that runs it (SIGKILL, as the out-of-memory killer does) while the
    file ``deaths`` holds a count above 0, counting down."""

    parent = deaths = None
    signum = signal.SIGKILL

    def _forward(self, x, epilogue=None):
        import os
        if os.getpid() != self.parent:
            left = int(self.deaths.read_text())
            if left > 0:
                self.deaths.write_text(str(left - 1))
                os.kill(os.getpid(), self.signum)
        return super()._forward(x, epilogue)


def _train_with_deaths(deaths, kills, steps=3, batch=130, signum=signal.SIGKILL):
    """Three SGD steps of a small net on two processes; before the second, ``kills`` workers are set to
    die in the middle of it (by ``signum``).  Returns the losses and the weights."""
    import os
    threads.set_num_threads(2)
    gc.seed(0)
    model = layers.Sequential(layers.Flatten(), layers.Dense(784, 10), _DiesInWorkers())
    model.layers[2].parent, model.layers[2].deaths = os.getpid(), deaths
    model.layers[2].signum = signum
    deaths.write_text("0")
    trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1, momentum=0.9),
                               batch_size=batch)
    x, y = _batch(batch * steps, np.float32)
    seen = []
    for s in range(steps):
        if s == 1:
            deaths.write_text(str(kills))
        seen.append(float(trainer.step(x[batch * s:batch * (s + 1)], y[batch * s:batch * (s + 1)])[0]))
    trainer.close()
    return seen, model.state_dict()


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
@pytest.mark.parametrize("kills, then", [(1, "on new workers"), (2, "on threads from now on")])
def test_a_worker_killed_mid_step_costs_a_warning_and_not_a_bit(restore_threads, tmp_path, kills, then):
    """The step runs again on new workers (its inputs and the parameters are untouched until the
    optimizer steps); when those die too, on threads: the same bits as a run where nothing died."""
    reference = _train_with_deaths(tmp_path / "deaths", 0)
    with pytest.warns(RuntimeWarning) as caught:
        got = _train_with_deaths(tmp_path / "deaths", kills)
    said = [str(w.message) for w in caught if "micro-batch worker" in str(w.message)]
    assert len(said) == kills
    assert all("ended in the middle of a step (killed by SIGKILL, as the out-of-memory killer does)" in m
               for m in said)
    assert said[-1].endswith(f"; the step runs again {then} (the same bits)")
    assert got[0] == reference[0]
    for key, value in reference[1].items():
        np.testing.assert_array_equal(got[1][key], value, err_msg=key)


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
def test_a_worker_sent_sigterm_dies_and_is_replaced_under_gpucnn_trains_handler(restore_threads, tmp_path):
    """The OOM daemons (earlyoom, systemd-oomd) send SIGTERM first.  Under ``gpucnn train``'s
    SIGTERM handler (stop like Ctrl-C), inherited at the fork, the worker raised instead of dying
    and the run ended in a traceback; a worker must die of it and be replaced, the same bits."""
    from gpucnn.train import stops

    reference = _train_with_deaths(tmp_path / "deaths", 0)
    with stops.sigterm_stops_like_ctrl_c(), pytest.warns(RuntimeWarning, match="killed by SIGTERM"):
        got = _train_with_deaths(tmp_path / "deaths", 1, signum=signal.SIGTERM)
    assert got[0] == reference[0]
    for key, value in reference[1].items():
        np.testing.assert_array_equal(got[1][key], value, err_msg=key)


@pytest.mark.skipif(not threads.can_fork(), reason="no fork on this system")
def test_a_worker_whose_parent_is_gone_mid_step_exits_quietly(restore_threads, capfd):
    """A parent killed mid-step (SIGTERM, SIGKILL) closes its end of the pipe: the worker finishing its
    share must end without a BrokenPipeError traceback."""
    threads.set_num_threads(2)
    gc.seed(0)
    model = models.build("lenet5")
    trainer = gc.train.Trainer(model, models.make_loss("lenet5"), optim.SGD(model, lr=0.1), batch_size=256)
    x, y = _batch(256, np.float32)
    trainer.step(x, y)                                         # forks the worker
    runner = trainer._runner.forked
    runner._seq += 1
    np.copyto(runner.x[..., :256], to_internal(x))
    runner.y[:256] = y
    runner.conns[0].send_bytes(workers._COMMAND.pack(runner._seq, 256, 1.0, True, 0))
    runner.conns[0].close()                                    # the parent "dies" while the worker works
    runner.procs[0].join(30)
    assert runner.procs[0].exitcode == 0
    assert "Traceback" not in capfd.readouterr().err
    runner.close()


class _Pair(layers.Sequential):
    """A Sequential subclass holding one more layer as an attribute (replicated with it)."""

    def __init__(self):
        super().__init__(layers.Dense(784, 10))
        self.inner = self.layers[0]


class _Boxed(layers.Sequential):
    """A Sequential subclass that also reports a layer kept in a dict: a replica would share it."""

    def __init__(self):
        super().__init__(layers.Dense(784, 10))
        self.box = {"inner": layers.Dense(784, 10)}

    def children(self):
        return self.layers + [self.box["inner"]]


def test_replicas_reach_the_layers_a_container_holds():
    net = layers.Sequential(layers.Flatten(), _Pair())
    assert workers.why_whole(net, losses.SoftmaxCrossEntropy()) is None
    twin = workers._replicate(net)
    inner, tinner = net.layers[1].inner, twin.layers[1].inner
    assert twin.layers is not net.layers and tinner is not inner
    assert tinner.params["W"] is inner.params["W"] and tinner.grads["W"] is not inner.grads["W"]
    assert tinner.workspace is not inner.workspace
    loss = losses.SoftmaxCrossEntropy()
    assert workers._replicate(loss).workspace is not loss.workspace
    boxed = layers.Sequential(layers.Flatten(), _Boxed())
    assert workers.why_whole(boxed, losses.SoftmaxCrossEntropy()) == \
        "_Boxed holds layers that are neither attributes nor lists of layers (a replica would share them)"
