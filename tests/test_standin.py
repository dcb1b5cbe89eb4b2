"""The CuPy stand-in (gpucnn/bench/standin.py) is at least as strict as CuPy where the launch-plan and
CUDA-graph checks rest on it.

Each test plants a fault the old, looser stand-in let through -- a capture on the null stream, a
sync inside a capture, an allocation its allocator never saw, a read of ``empty`` memory, a NumPy
call on a device array -- and shows that it is now caught, as it would be on a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn.bench import standin


@pytest.fixture
def cp():
    with standin.installed(standin.Recorder()) as module:
        yield module


# -- 1. streams: pointers as CuPy's, no capture on the legacy default stream -----------------------


def test_the_null_stream_has_pointer_0_and_new_streams_distinct_nonzero_pointers(cp):
    assert cp.cuda.get_current_stream().ptr == 0 and cp.cuda.get_current_stream() == cp.cuda.Stream.null
    assert cp.cuda.Stream(null=True).ptr == 0
    ptrs = [cp.cuda.Stream(non_blocking=True).ptr for _ in range(3)]
    assert len(set(ptrs)) == 3 and 0 not in ptrs and 1 not in ptrs and 2 not in ptrs
    s = cp.cuda.Stream()
    with s:
        assert cp.cuda.get_current_stream() is s
    assert cp.cuda.get_current_stream().ptr == 0


@pytest.mark.parametrize("which", ["current (null) stream", "Stream(null=True)"])
def test_capture_on_the_null_stream_is_refused_as_cupy_refuses_it(cp, which):
    """Planted fault: capturing on the default stream (CuPy raises before CUDA sees it)."""
    stream = cp.cuda.get_current_stream() if which.startswith("current") else cp.cuda.Stream(null=True)
    with pytest.raises(RuntimeError, match=r"^cannot capture on the default \(legacy\) stream$"):
        stream.begin_capture()
    assert not stream.is_capturing()


def test_a_kernel_launched_on_another_stream_is_not_captured(cp):
    """Planted fault: work meant for the graph issued on a stream other than the capturing one runs
    at once on that stream (as on CUDA), it does not join the graph."""
    rec = standin._rec()
    ran = []
    fn = standin._RecordingFunction("k", lambda grid, block, args, shared_mem=0: ran.append(args))
    capturing, other = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    with capturing:
        capturing.begin_capture()
        assert capturing.is_capturing() and not other.is_capturing()
        fn((1,), (1,), ("captured",))
        with other:
            fn((1,), (1,), ("eager",))
        graph = capturing.end_capture()
    assert ran == [("eager",)] and [e.name for e in rec.events if e.kind == "kernel"] == ["k"]
    graph.launch()
    assert ran == [("eager",), ("captured",)]


# -- 2. what invalidates a capture on CUDA makes end_capture fail -----------------------------------


def _sync_faults():
    host = np.arange(4, dtype=np.float32)
    return {
        "float(array)": lambda cp, a: float(a[0]),
        "int(array)": lambda cp, a: int(a[1]),
        "bool(array)": lambda cp, a: bool(a[1]),
        "array.item()": lambda cp, a: a[0].item(),
        "array.tolist()": lambda cp, a: a.tolist(),
        "array.get()": lambda cp, a: a.get(),
        "asnumpy": lambda cp, a: cp.asnumpy(a),
        "stream.synchronize": lambda cp, a: cp.cuda.get_current_stream().synchronize(),
        "Device.synchronize": lambda cp, a: cp.cuda.Device().synchronize(),
        "asarray (host to device)": lambda cp, a: cp.asarray(host),
        "array.set() (host to device)": lambda cp, a: a.set(host),
    }


@pytest.mark.parametrize("fault", list(_sync_faults()))
def test_a_sync_or_host_copy_inside_a_capture_fails_end_capture(cp, fault):
    """Planted faults: each host synchronisation and host-to-device copy CUDA refuses in a capture."""
    a = cp.arange(4, dtype=np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        _sync_faults()[fault](cp, a)          # passes here (CUDA reports it at the end of the capture)
        with pytest.raises(RuntimeError, match="invalidates a CUDA stream capture"):
            stream.end_capture()
    assert not stream.is_capturing()
    stream.begin_capture()                    # the failed capture is over: the next one is clean
    assert isinstance(stream.end_capture(), standin._Graph)
