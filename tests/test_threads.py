"""The NumPy path's own threads (gpucnn/threads.py): same bits for any thread count."""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import losses, models, optim
from gpucnn import threads


@pytest.fixture
def restore_threads(monkeypatch):
    """Restores the thread count afterwards; meanwhile the process may use 8 cores, so that a
    2-core box still runs 3 threads (thread counts are capped at the usable cores)."""
    before = threads.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    yield
    threads.set_num_threads(before)


def _train_steps(name, n_threads, steps=3, batch=48):
    threads.set_num_threads(n_threads)
    gc.seed(0)
    model = models.build(name)
    trainer = gc.train.Trainer(model, models.make_loss(name), optim.SGD(model, lr=0.05, momentum=0.9),
                               batch_size=batch)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch * steps, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, batch * steps)
    order = np.arange(batch * steps)
    seen = []
    trainer.run_steps(x, y, order, 0, range(steps), steps, on_sync=lambda st, k: seen.append(st.loss_sum))
    return seen, model.state_dict()


@pytest.mark.parametrize("name", ["lenet5", "resnet_mini"])
def test_training_is_the_same_bits_for_any_thread_count(name, restore_threads):
    one = _train_steps(name, 1)
    for n in (2, 3):
        other = _train_steps(name, n)
        assert other[0] == one[0], f"losses differ with {n} threads"
        for key, value in one[1].items():
            np.testing.assert_array_equal(other[1][key], value, err_msg=f"{key} with {n} threads")


def test_thread_count_from_the_environment(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "_num_threads", None)
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.get_num_threads() == 3
    monkeypatch.setattr(threads, "_num_threads", None)
    monkeypatch.setenv(threads.ENV_VAR, "zero")
    with pytest.raises(ValueError, match="GPUCNN_NUM_THREADS must be a positive integer, got 'zero'"):
        threads.get_num_threads()
    monkeypatch.delenv(threads.ENV_VAR)
    monkeypatch.setattr(threads, "_num_threads", None)


def test_bad_thread_count_is_refused(restore_threads):
    with pytest.raises(ValueError, match="num_threads must be a positive integer, got 0"):
        threads.set_num_threads(0)


def test_cli_threads_flag(tmp_path, capsys, restore_threads):
    from gpucnn import cli

    threads.set_num_threads(2) if threads.usable_cores() >= 2 else None
    before = threads.get_num_threads()
    assert cli.main(["train", "--threads", "1", "--subset", "64", "--test-subset", "64", "--epochs", "1",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert threads.get_num_threads() == before          # the run's count, put back when it ended


def test_map_each_keeps_block_order_and_raises_what_a_block_raised(restore_threads):
    threads.set_num_threads(3)
    assert threads.map_each(lambda a, b: (a, b), [(i, i * i) for i in range(7)]) == [(i, i * i) for i in range(7)]
    seen = []

    def block(i):
        if i == 4:
            raise ValueError("block 4")
        seen.append(i)
        return i

    with pytest.raises(ValueError, match="block 4"):
        threads.map_each(block, [(i,) for i in range(7)])
    assert sorted(seen) == [0, 1, 2, 3, 5, 6]       # every other block ran to the end first


def test_nested_map_each_runs_inline(restore_threads):
    threads.set_num_threads(2)
    import threading

    def inner(i):
        return threading.current_thread().name

    def outer(i):
        return threads.map_each(inner, [(j,) for j in range(4)])

    for names in threads.map_each(outer, [(0,), (1,)]):
        assert len(set(names)) == 1                  # one thread ran all of a block's inner blocks


def test_thread_counts_above_the_usable_cores_are_capped_with_a_note(monkeypatch, restore_threads, capsys, tmp_path):
    """--threads 1000 on 2 cores forked 999 workers and trained 20 times slower: now capped at the cores."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    with pytest.warns(threads.ThreadCountWarning, match=r"num_threads 300 is more than the 2 CPU core\(s\) "
                                                        r"this process may use; using 2"):
        threads.set_num_threads(300)
    assert threads.get_num_threads() == 2
    monkeypatch.setattr(threads, "_num_threads", None)
    monkeypatch.setenv(threads.ENV_VAR, "64")
    with pytest.warns(threads.ThreadCountWarning, match=r"GPUCNN_NUM_THREADS 64 is more than the 2"):
        assert threads.get_num_threads() == 2
    monkeypatch.delenv(threads.ENV_VAR)

    from gpucnn import cli

    assert cli.main(["train", "--threads", "1000", "--subset", "64", "--test-subset", "64", "--epochs", "1",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert notes == ["gpucnn train: note: --threads 1000 is more than the 2 CPU core(s) this process may use; "
                     "using 2 thread(s) (more only slows the NumPy path down; results are the same for any count)"]
    assert threads.get_num_threads() == 2
