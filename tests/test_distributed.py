"""Data-parallel training on MPI (and NCCL): equivalence, faults, resume with other rank counts.

The multi-rank tests start ``mpiexec -n N`` in a subprocess (its own process
group, with a timeout) running this file as the worker (``python
tests/test_distributed.py SPEC``, see :func:`_worker`) or ``python -m gpucnn
train --distributed``.  BLAS is pinned to one thread per rank.  The float64
runs use seed002_c1 built with ``dtype=float64`` (passed as ``model=``) on a
few hundred MNIST images, so each launch takes about two seconds.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the worker runs this file as a script
    sys.path.insert(0, str(ROOT))

from gpucnn import checkpoint as ck  # noqa: E402
from gpucnn import distributed as dist  # noqa: E402


def _find_mpiexec():
    """``mpiexec`` on PATH, else beside this Python (the mpich wheel's, in a venv or a --user install)."""
    found = shutil.which("mpiexec")
    if found:
        return found
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        candidate = Path(scripts) / "mpiexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


MPIEXEC = _find_mpiexec()
HAVE_MPI = MPIEXEC is not None and importlib.util.find_spec("mpi4py") is not None
# CI sets GPUCNN_REQUIRE_MPI=1 so that a missing MPI fails instead of skipping
if os.environ.get("GPUCNN_REQUIRE_MPI") == "1" and not HAVE_MPI:
    raise RuntimeError("GPUCNN_REQUIRE_MPI=1 but mpiexec or mpi4py is missing: pip install mpi4py mpich")
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpiexec and mpi4py (pip install mpi4py mpich)")
TIMING = {"images_per_sec", "train_seconds", "seconds", "ranks"}
# 640 images / batch 64 = 10 steps per epoch, 3 epochs = 30 steps
BASE = dict(model="seed002_c1", epochs=3, batch_size=64, subset=640, test_subset=500, seed=3)
SGD = dict(BASE, optimizer="sgd", lr=0.05, momentum=0.9)
ADAM = dict(BASE, optimizer="adam")
AUGMENTED = dict(SGD, augment=True, epochs=2)  # lenet5's default: every training image shifted
F64 = dict(rtol=0.0, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-6)


# -- the worker ------------------------------------------------------------------------------------


def _inject(spec_fault, rank):
    """Make this rank raise (or die of SIGKILL, or stop with SIGSTOP) at its ``at``-th training step."""
    if spec_fault is None or spec_fault["rank"] != rank:
        return
    from gpucnn.train import Trainer

    real, calls = Trainer.step_shard, {"n": 0}

    def step_shard(self, xb, yb, n_global, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == spec_fault["at"]:
            if spec_fault.get("kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            if spec_fault.get("stop"):              # alive, but never arrives
                Path(spec_fault["pidfile"]).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)
            raise RuntimeError(f"injected fault at training step {calls['n']}")
        return real(self, xb, yb, n_global, *args, **kwargs)

    Trainer.step_shard = step_shard


def _worker(spec: dict) -> None:
    """Run ``spec["runs"]`` (each: cfg, dtype, out, resume, stop_after, fault) with ``distributed=backend``."""
    import gpucnn as gc
    from gpucnn import data as gdata
    from gpucnn.train import TrainConfig, train

    device = spec.get("device", "cpu")
    backend_name = spec.get("backend", "auto")
    comm = dist.init(backend_name, device)
    ds = gdata.load_dataset("mnist")
    for run in spec["runs"]:
        _inject(run.get("fault"), comm.rank)
        cfg = TrainConfig(**run["cfg"])
        gc.seed(cfg.seed)
        model = gc.models.build(cfg.model, dtype=np.dtype(run.get("dtype", "float64")))
        train(None if run.get("resume") else cfg, model=model, data=ds, device=device, out_dir=run.get("out"),
              resume=run.get("resume"), stop_after=run.get("stop_after"), overwrite=True, progress=False,
              log=print, distributed=comm, collective_timeout=run.get("collective_timeout"))


# -- helpers ---------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if os.geteuid() == 0:  # Open MPI's mpiexec refuses root without these (MPICH's ignores them)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if MPIEXEC:  # hydra finds its proxy (hydra_pmi_proxy) on PATH
        env["PATH"] = str(Path(MPIEXEC).parent) + os.pathsep + env.get("PATH", "")
    return env


def mpiexec(n, *argv, timeout=90, env=None):
    """``mpiexec -n n argv...`` in its own process group; killed (all of it) after ``timeout`` s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), *map(str, argv)], cwd=ROOT, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mpiexec -n {n} {' '.join(map(str, argv))} hung for {timeout} s\n"
                             f"stdout:\n{out}\nstderr:\n{err}") from None
    proc.seconds = time.perf_counter() - t0
    proc.out, proc.err = out, err
    return proc


def run_workers(n, spec, check=True, timeout=90, env=None):
    proc = mpiexec(n, sys.executable, Path(__file__).resolve(), json.dumps(spec), timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"workers exited {proc.returncode}\nstdout:\n{proc.out}\nstderr:\n{proc.err}")
    return proc


@functools.lru_cache(maxsize=1)
def _mnist():
    from gpucnn import data as gdata

    return gdata.load_dataset("mnist")


def train_here(cfg: dict, out, dtype="float64", **kw):
    """The single-process reference run (no ``distributed``)."""
    import gpucnn as gc
    from gpucnn.train import TrainConfig, train

    c = TrainConfig(**cfg)
    gc.seed(c.seed)
    model = gc.models.build(c.model, dtype=np.dtype(dtype))
    return train(c, model=model, data=_mnist(), device=kw.pop("device", "cpu"), out_dir=out,
                 progress=False, log=None, **kw)


def rows(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, tol):
    """Checkpoints (parameters, optimizer slots and step count) and metrics of runs a and b agree."""
    A, B = ck.load_checkpoint(a), ck.load_checkpoint(b)
    assert A.epoch == B.epoch and A.rng == B.rng
    assert sorted(A.params) == sorted(B.params)
    for k in A.params:
        assert A.params[k].dtype == B.params[k].dtype
        np.testing.assert_allclose(B.params[k], A.params[k], **tol, err_msg=f"parameter {k}")
    assert sorted(A.optimizer["slots"]) == sorted(B.optimizer["slots"])
    for k in A.optimizer["slots"]:
        np.testing.assert_allclose(B.optimizer["slots"][k], A.optimizer["slots"][k], **tol, err_msg=f"slot {k}")
    assert A.optimizer["step_count"] == B.optimizer["step_count"]
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra, rb):
        assert set(x) - TIMING == set(y) - TIMING
        for key in set(x) - TIMING:  # losses to the tolerance; accuracies, lr, epoch, device exactly
            if key.endswith("loss"):
                assert y[key] == pytest.approx(x[key], rel=max(tol["rtol"], 1e-12), abs=tol["atol"]), key
            else:
                assert y[key] == x[key], key


# -- without mpiexec -------------------------------------------------------------------------------


def test_single_process_communicator_and_metadata():
    c = dist.SingleProcess()
    assert (c.rank, c.size, c.is_root) == (0, 1, True)
    buf = np.arange(4.0)
    c.allreduce_sum(buf)
    c.broadcast(buf)
    assert buf.tolist() == [0, 1, 2, 3]
    assert c.allreduce_scalars([1, 2.5], op="max").tolist() == [1.0, 2.5]
    assert c.broadcast_json({"a": [1, "x"]}) == {"a": [1, "x"]}
    assert c.broadcast_bytes(b"") == b""
    with pytest.raises(ValueError, match="op must be 'sum' or 'max', got op='min'"):
        c.allreduce_scalars([1], op="min")
    with pytest.raises(ValueError, match="distributed backend must be one of auto, single, mpi, nccl, got 'tcp'"):
        dist.init("tcp")


def test_launcher_detection_and_blas_threads():
    assert dist.launched_size({}) is None
    assert dist.launched_size({"PMI_SIZE": "4", "PMI_RANK": "1"}) == 4
    assert dist.launched_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert dist.launched_size({"PMIX_RANK": "0"}) == 1
    assert dist.limit_blas_threads(2, env={"OPENBLAS_NUM_THREADS": "3"}) is None  # set by the user: left alone
    assert dist.exit_code(KeyboardInterrupt()) == 130 and dist.exit_code(RuntimeError()) == 1


@pytest.mark.parametrize("uid", [bytes(range(128)), tuple(range(-64, 64)), tuple(range(100, 228))])
def test_nccl_unique_id_travels_as_bytes(uid):
    buf = dist._encode_nccl_id(uid)
    assert buf.dtype == np.uint8 and buf.shape == (129,)
    assert dist._decode_nccl_id(buf) == uid


def test_collective_timeout_is_checked():
    c = dist.SingleProcess()
    assert c.timeout == dist.DEFAULT_COLLECTIVE_TIMEOUT_S == 600
    c.timeout = 2.5
    assert c.timeout == 2.5 and dist.SingleProcess().timeout == 600      # per communicator
    for bad in (0, -1, float("nan"), float("inf"), "60", True, None):
        with pytest.raises(ValueError, match=r"collective_timeout must be a positive number of seconds, got "
                                             r"collective_timeout="):
            c.timeout = bad
    from gpucnn.train import train

    with pytest.raises(ValueError, match=r"collective_timeout must be .* got collective_timeout=-5"):
        train(distributed=True, collective_timeout=-5, log=None)
    with pytest.raises(ValueError, match=r"collective_timeout=30 needs distributed=True"):
        train(collective_timeout=30, log=None)


def test_rank0_errors_are_raised_everywhere_as_collective():
    from gpucnn.train import parallel

    def boom():
        raise ValueError("bad value 7")

    with pytest.raises(ValueError, match="bad value 7") as info:
        parallel.share(dist.SingleProcess(), boom)
    assert info.value.collective
    assert parallel.share(dist.SingleProcess(), lambda: {"x": 1}) == {"x": 1}


def test_distributed_size_one_is_bit_identical(tmp_path):
    """``distributed=True`` outside mpiexec is one process and changes nothing, bit for bit."""
    plain = train_here(SGD, tmp_path / "plain", dtype="float32")
    one = train_here(SGD, tmp_path / "one", dtype="float32", distributed=True)
    assert one.world_size == 1 and "images/s (cpu)" in one.summary()
    A, B = ck.load_checkpoint(tmp_path / "plain"), ck.load_checkpoint(tmp_path / "one")
    for k in A.params:
        assert A.params[k].tobytes() == B.params[k].tobytes(), k
    for k in A.optimizer["slots"]:
        assert A.optimizer["slots"][k].tobytes() == B.optimizer["slots"][k].tobytes(), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(plain.metrics) == strip(one.metrics) == strip(rows(tmp_path / "one"))


# -- through mpiexec -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1 process x batch 64, float64: SGD with momentum and Adam."""
    root = tmp_path_factory.mktemp("ref")
    train_here(SGD, root / "sgd")
    train_here(ADAM, root / "adam")
    return root


@needs_mpi
def test_two_ranks_equal_one_process_float64(references, tmp_path):
    """2 ranks x 32 == 1 process x 64 after 30 steps, to 1e-12 (SGD+momentum and Adam), metrics too."""
    spec = {"runs": [{"cfg": SGD, "out": str(tmp_path / "sgd")}, {"cfg": ADAM, "out": str(tmp_path / "adam")}]}
    proc = run_workers(2, spec)
    assert proc.out.count("done:") == 0  # the worker does not print a summary ...
    assert proc.out.count("distributed: mpi, 2 ranks") == 2  # ... and only rank 0 logs (one line per run)
    for name in ("sgd", "adam"):
        assert_same_run(references / name, tmp_path / name, F64)
        assert all(r["ranks"] == 2 for r in rows(tmp_path / name))


@needs_mpi
def test_augmented_two_ranks_and_resume_on_three_equal_one_process(references, tmp_path):
    """With augmentation each image's shift is keyed by its position in the epoch, not by the
    rank's index into its shard: 2 ranks equal one process, and so does a run stopped after
    epoch 1 on 2 ranks and resumed on 3 (shards 22/21/21 instead of 32/32)."""
    train_here(AUGMENTED, tmp_path / "one")
    assert rows(tmp_path / "one")[0]["train_loss"] != rows(references / "sgd")[0]["train_loss"]  # shifts on
    run_workers(2, {"runs": [{"cfg": AUGMENTED, "out": str(tmp_path / "two")},
                             {"cfg": AUGMENTED, "out": str(tmp_path / "resumed"), "stop_after": 1}]})
    run_workers(3, {"runs": [{"cfg": AUGMENTED, "resume": str(tmp_path / "resumed")}]})
    assert_same_run(tmp_path / "one", tmp_path / "two", F64)
    assert_same_run(tmp_path / "one", tmp_path / "resumed", F64)


@needs_mpi
def test_cli_two_ranks_equal_one_process_float32(tmp_path):
    """``mpiexec -n 2 gpucnn train --distributed`` == ``gpucnn train`` (float32: atol 1e-6 + rtol 1e-5).

    zhang2016 (sigmoid, average pooling, MSE) is smooth everywhere.  Through a
    max-pool, a float32 difference of one ulp (any change of summation order)
    can flip the argmax of a window whose top two inputs are closer than
    1e-7, and the runs then drift apart at ~1e-4: measured with seed002_c1,
    one flipped window of 55296 at the fifth step; float64 keeps such
    differences at 1e-16, far below any near-tie (the float64 tests use it).
    """
    from gpucnn import cli

    args = ["--model", "zhang2016", "--subset", "512", "--test-subset", "300", "--epochs", "2", "--seed", "1",
            "--device", "cpu", "--no-progress"]
    assert cli.main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    env = _env()
    for var in dist.BLAS_ENV_VARS:  # let gpucnn choose the BLAS threads per rank
        env.pop(var, None)
    proc = mpiexec(2, sys.executable, "-m", "gpucnn", "train", *args, "--distributed", "--out", tmp_path / "two",
                   "--collective-timeout", "120", env=env)
    assert proc.returncode == 0, proc.err
    assert "collectives time out after 120 s" in proc.out
    lines = proc.out.strip().splitlines()
    assert proc.out.count("done:") == 1 and lines[-1].startswith("done: zhang2016 on mnist, 2 epochs")
    assert "(cpu, 2 ranks)" in lines[-1]
    cores = os.cpu_count() or 1
    n = min(max(1, cores // 2), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores)
    assert f"{n} BLAS thread{'s' if n != 1 else ''} per rank" in proc.out
    assert_same_run(tmp_path / "one", tmp_path / "two", F32)


@needs_mpi
def test_fault_on_one_rank_aborts_then_resume_with_three_ranks(references, tmp_path):
    """Rank 1 raises in epoch 2: the job ends in seconds naming rank 1; resuming on 3 ranks finishes the run."""
    out = tmp_path / "run"
    fault = {"rank": 1, "at": 13}  # epoch 2, step 3
    proc = run_workers(2, {"runs": [{"cfg": SGD, "out": str(out), "fault": fault}]}, check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.seconds < 30, f"took {proc.seconds:.1f} s"
    assert "gpucnn: rank 1: RuntimeError: injected fault at training step 13" in proc.err, proc.err
    c = ck.load_checkpoint(out)  # the last complete checkpoint is intact
    assert c.epoch == 1 and [r["epoch"] for r in rows(out)] == [1]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # 3 ranks: uneven shards of 22/21/21 examples; the scaled gradients keep it exact
    run_workers(3, {"runs": [{"cfg": SGD, "resume": str(out)}]})
    assert_same_run(references / "sgd", out, F64)


@needs_mpi
def test_uneven_and_empty_shards(tmp_path):
    """3 ranks, batches of 64, 64 and 1 (two ranks get no example of the last one): still exact."""
    cfg = dict(ADAM, subset=129, test_subset=101, epochs=2)
    train_here(cfg, tmp_path / "one")
    run_workers(3, {"runs": [{"cfg": cfg, "out": str(tmp_path / "three")}]})
    assert_same_run(tmp_path / "one", tmp_path / "three", F64)


@needs_mpi
def test_rank_killed_by_a_signal_ends_the_job(tmp_path):
    fault = {"rank": 1, "at": 5, "kill": True}
    proc = run_workers(2, {"runs": [{"cfg": SGD, "out": str(tmp_path / "k"), "fault": fault}]}, check=False,
                       timeout=60)
    assert proc.returncode != 0 and proc.seconds < 30
    assert not (tmp_path / "k" / "checkpoint.npz").exists()


@needs_mpi
def test_stopped_rank_times_out_and_is_named(tmp_path):
    """Rank 1 of 3 stops (SIGSTOP: alive, never arrives): within the collective timeout and the roll
    call (4 s each here) ranks 0 and 2 abort the job, naming rank 1; nothing is left running.
    Without the timeout the job hangs in the gradient allreduce until the test kills it."""
    pidfile = tmp_path / "stopped.pid"
    fault = {"rank": 1, "at": 4, "stop": True, "pidfile": str(pidfile)}
    run = {"cfg": dict(SGD, epochs=1), "out": str(tmp_path / "s"), "fault": fault, "collective_timeout": 4}
    try:
        proc = run_workers(3, {"runs": [run]}, check=False, timeout=60)
        assert proc.returncode != 0
        assert proc.seconds < 45, f"took {proc.seconds:.1f} s"
        named = [line for line in proc.err.splitlines() if "CollectiveTimeout" in line]
        assert named, proc.err
        for line in named:  # rank 0 or 2 (or both) tells, none blames another
            assert line.startswith(("gpucnn: rank 0: CollectiveTimeout: allreduce #",
                                    "gpucnn: rank 2: CollectiveTimeout: allreduce #")), line
            assert "did not complete within 4 s: rank 1 did not arrive" in line, line
    finally:  # the launcher has ended the job; make sure of the stopped rank (its own process group)
        pid = int(pidfile.read_text()) if pidfile.exists() else None
        cmdline = Path(f"/proc/{pid}/cmdline")
        if pid is not None and cmdline.exists() and b"test_distributed.py" in cmdline.read_bytes():
            os.kill(pid, signal.SIGKILL)


@needs_mpi
def test_nan_loss_stops_every_rank_with_status_3(tmp_path):
    proc = mpiexec(2, sys.executable, "-m", "gpucnn", "train", "--distributed", "--epochs", "1", "--subset", "256",
                   "--test-subset", "100", "--lr", "1e30", "--lr-schedule", "constant", "--momentum", "0",
                   "--out", tmp_path / "nan", "--no-progress")
    assert proc.returncode == 3, proc.err
    assert proc.err.count("gpucnn: error: training loss is nan at epoch 1, step") == 1, proc.err  # rank 0 only
    assert not (tmp_path / "nan" / "checkpoint.npz").exists()


# -- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_mpi
@pytest.mark.parametrize("ranks,backend", [(1, "nccl"), (2, "mpi")], ids=["nccl-1-rank", "mpi-2-ranks-one-gpu"])
def test_gpu_ranks_equal_one_process(cupy_xp, tmp_path, ranks, backend):
    """NCCL at size 1, and 2 MPI ranks sharing the GPU (host staging), equal the single-process GPU run.

    float32 on the smooth zhang2016 (see the CLI test on max-pool near-ties).
    """
    cfg = dict(BASE, model="zhang2016", subset=512, epochs=2)
    train_here(cfg, tmp_path / "one", dtype="float32", device="cuda")
    spec = {"device": "cuda", "backend": backend,
            "runs": [{"cfg": cfg, "dtype": "float32", "out": str(tmp_path / "dist")}]}
    proc = run_workers(ranks, spec, timeout=300)
    assert f"distributed: {backend}, {ranks} rank" in proc.out
    assert_same_run(tmp_path / "one", tmp_path / "dist", F32)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
