"""The CuPy stand-in (gpucnn/bench/standin.py) is at least as strict as CuPy where the CUDA-graph
checks rest on it.

Each test plants a fault the old, looser stand-in let through -- a capture on the null stream, a
sync inside a capture, an allocation its allocator never saw, a read of ``empty`` memory, a NumPy
call on a device array -- and shows that it is now caught, as it would be on a GPU.
"""
from __future__ import annotations

import types

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


def test_a_cupy_function_inside_a_capture_fails_end_capture(cp):
    """Planted fault: a CuPy function that writes in place (no allocation to give it away) inside
    a capture -- the stand-in runs it at once and its graph would replay without it."""
    dst, src = cp.zeros(4, np.float32), cp.arange(4, dtype=np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cp.copyto(dst, src)
        with pytest.raises(RuntimeError, match=r"a CuPy operation \(copyto\)"):
            stream.end_capture()
    assert [e.name for e in standin._rec().events if e.kind == "xp"][-1] == "copyto"


# -- 3. every new device array comes from the allocator in use ----------------------------------------

ALLOCATING = {
    "empty": lambda cp, a: cp.empty((2, 3), np.float32),
    "empty_like": lambda cp, a: cp.empty_like(a),
    "zeros": lambda cp, a: cp.zeros(5, np.int32),
    "full": lambda cp, a: cp.full((2,), 3.0),
    "arange": lambda cp, a: cp.arange(7),
    "asarray (host)": lambda cp, a: cp.asarray(np.ones(3)),
    "ascontiguousarray (copy)": lambda cp, a: cp.ascontiguousarray(a.T),
    "ufunc": lambda cp, a: cp.exp(a),
    "operator": lambda cp, a: a + 1,
    "reduction": lambda cp, a: a.sum(axis=0),
    "0-d reduction": lambda cp, a: cp.max(a),
    "astype": lambda cp, a: a.astype(np.float64),
    "copy": lambda cp, a: a.copy(),
    "fancy index": lambda cp, a: a[cp.asarray(np.array([1, 0]))],
    "reshape (copy)": lambda cp, a: a.T.reshape(6),
    "function": lambda cp, a: cp.concatenate([a, a]),
    "where": lambda cp, a: cp.where(a > 2, a, 0),
}


@pytest.mark.parametrize("make", list(ALLOCATING))
def test_every_new_device_array_goes_through_the_allocator(cp, make):
    """Planted fault: an allocator that fails -- each way of making a new array must fail with it
    (the old stand-in called the allocator from ``empty``/``zeros``... only)."""
    a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    sizes, inner = [], cp.cuda.get_allocator()

    def counting(size):
        sizes.append(size)
        return inner(size)

    with cp.cuda.using_allocator(counting):
        out = ALLOCATING[make](cp, a)
    assert out.nbytes in sizes

    class OutOfMemory(MemoryError):
        pass

    def exhausted(size):
        raise OutOfMemory(f"Out of memory allocating {size} bytes")

    with cp.cuda.using_allocator(exhausted), pytest.raises(OutOfMemory):
        ALLOCATING[make](cp, a)


def test_views_allocate_nothing(cp):
    a = cp.zeros((4, 6), np.float32)

    def refuse(size):
        raise AssertionError(f"allocated {size} bytes")

    with cp.cuda.using_allocator(refuse):
        views = [a[1], a[1:3], a[:, ::2], a.T, a.reshape(24), a.ravel(), a.view(np.int32), a[0, 0],
                 a.astype(np.float32, copy=False), cp.moveaxis(a, 0, 1), cp.asarray(a)]
    assert all(np.shares_memory(v._a, a._a) for v in views)


def test_the_array_lives_in_the_memory_its_allocator_returned(cp):
    """Planted fault: an allocator whose return value matters -- here one that hands out the same
    block twice (a pool that recycles memory still in use); the arrays then share it, as on CuPy."""
    block = cp.cuda.alloc(64)
    with cp.cuda.using_allocator(lambda size: block):
        first = cp.zeros(4, np.float32)
        second = cp.arange(4, dtype=np.float32) * 10
    assert first.data.ptr == second.data.ptr == block.ptr
    assert cp.asnumpy(first).tolist() == [0.0, 10.0, 20.0, 30.0]      # overwritten by the second


@pytest.mark.parametrize("returned, error", [
    (lambda size: None, r"^Cannot convert NoneType to cupy.cuda.memory.MemoryPointer$"),
    (lambda size: standin._Memory(np.empty(size, np.uint8)), "host memory"),
    (lambda size: standin._malloc(size // 2), "returned 12 bytes of device memory for 24 bytes"),
], ids=["none", "host-memory", "too-small"])
def test_an_allocator_returning_no_usable_memory_fails_the_allocation(cp, returned, error):
    with cp.cuda.using_allocator(returned), pytest.raises((TypeError, ValueError), match=error):
        cp.zeros(6, np.float32)


def test_set_allocator_is_global_and_refused_inside_using_allocator(cp):
    sizes = []
    cp.cuda.set_allocator(lambda size: (sizes.append(size), standin._malloc(size))[1])
    cp.ones(3, np.float64)
    assert sizes == [24] and cp.cuda.get_allocator() is not standin._malloc
    with cp.cuda.using_allocator(None), pytest.raises(ValueError, match="inside `using_allocator`"):
        cp.cuda.set_allocator(None)
    cp.cuda.set_allocator(None)
    assert cp.cuda.get_allocator() is standin._malloc


def test_an_allocation_inside_a_capture_fails_end_capture(cp):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cp.empty(3)
        with pytest.raises(RuntimeError, match="a device allocation"):
            stream.end_capture()


# -- 4. empty memory holds garbage, as CuPy's recycled memory does ---------------------------------


@pytest.mark.parametrize("dtype, garbage", [
    (np.float32, np.nan), (np.float64, np.nan), (np.int32, 2**31 - 1), (np.int64, 2**63 - 1),
    (np.uint8, 255), (np.bool_, True)])
def test_empty_memory_holds_garbage(dtype, garbage):
    """Planted fault: reading an ``empty`` array before writing it -- the old stand-in gave zeros."""
    with standin.installed(standin.Recorder(), garbage=True) as cp:
        for a in (cp.empty((2, 3), dtype), cp.empty_like(cp.zeros(4, dtype)), cp.empty_like(cp.zeros(4), dtype=dtype)):
            np.testing.assert_array_equal(cp.asnumpy(a), np.full(a.shape, garbage, dtype))
        partial = cp.empty(4, dtype)
        partial[:3] = 1                              # the last element is never written ...
        np.testing.assert_array_equal(cp.asnumpy(partial), np.array([1, 1, 1, garbage], dtype))  # ... and shows


def test_empty_memory_is_zeroed_only_with_kernels_stubbed(cp):
    """With kernels stubbed nothing writes their outputs: zeros keep the step on valid numbers."""
    assert not cp.asnumpy(cp.empty(3)).any()


def test_a_kernel_that_leaves_its_output_unwritten_shows():
    """Planted fault in gpucnn: the dense layer's kernel does not write its output (a grid too
    small, a missed launch); the step reads the output left as ``empty`` made it.  With zeros
    (the old stand-in) training went on quietly; garbage makes the loss NaN, and training stops."""
    import gpucnn as gc
    from backends import emulator_builder, replay_data, replay_net, skip_without_emulator
    from gpucnn import losses, optim
    from gpucnn.train.config import NonFiniteLossError

    skip_without_emulator()

    def forgetful(code, name, options):
        module = emulator_builder(code, name, options)
        return types.SimpleNamespace(get_function=lambda k: (lambda *a, **kw: None) if k == "dense_forward"
                                     else module.get_function(k))

    x, y, orders = replay_data()
    with standin.installed(standin.Recorder(), builder=forgetful) as cp:
        model = replay_net().to("cuda")
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False), optim.SGD(model, lr=0.1),
                                   batch_size=5, sync_every=3, cuda_graph=False)
        with pytest.raises(NonFiniteLossError, match="training loss is nan"):
            trainer.run_steps(cp.asarray(x), cp.asarray(y), cp.asarray(orders[0]), 0, range(4), 4)


# -- 5. NumPy refuses a device array, as it refuses CuPy's -------------------------------------------

NUMPY_ON_DEVICE = {
    "np.asarray": lambda a, host: np.asarray(a),
    "np.array": lambda a, host: np.array(a, copy=True),
    "np.ascontiguousarray": lambda a, host: np.ascontiguousarray(a),
    "np.testing": lambda a, host: np.testing.assert_array_equal(a, a),
    "np.float32(array)": lambda a, host: np.float32(a[0]),
    "np.sum": lambda a, host: np.sum(a),
    "np.concatenate": lambda a, host: np.concatenate([a, a]),
    "np.exp": lambda a, host: np.exp(a),
    "np.maximum out=": lambda a, host: np.maximum(a, 0, out=a),
    "np.add.reduce": lambda a, host: np.add.reduce(a),
    "device + host": lambda a, host: a + host,
    "host + device": lambda a, host: host + a,
    "device += host": lambda a, host: a.__iadd__(host),
    "cp-module ufunc on host": lambda a, host: standin.standin.multiply(a, host),
}


@pytest.mark.parametrize("fault", list(NUMPY_ON_DEVICE))
def test_numpy_on_a_device_array_raises_type_error(cp, fault):
    """Planted faults: a NumPy call, an implicit conversion, or a host array mixed into a device
    operation -- each raises TypeError (the old stand-in, a NumPy subclass, ran them all)."""
    a, host = cp.arange(4, dtype=np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match=r"Implicit conversion to a NumPy array is not allowed|"
                                        r"Unsupported type <class 'numpy.ndarray'>|"
                                        r"numpy\.\w+ was applied to a device array"):
        NUMPY_ON_DEVICE[fault](a, host)


def test_implicit_conversion_raises_cupys_type_error(cp):
    with pytest.raises(TypeError) as info:
        np.asarray(cp.zeros(3))
    assert str(info.value) == ("Implicit conversion to a NumPy array is not allowed. "
                               "Please use `.get()` to construct a NumPy array explicitly.")
    assert not isinstance(cp.zeros(3), np.ndarray)


def test_the_stand_in_module_methods_and_operators_work_on_device_arrays(cp):
    rec = standin._rec()
    a = cp.arange(6, dtype=np.float32).reshape(2, 3)
    b = (a * 2 + 1) @ a.T
    c = cp.maximum(cp.exp(a - a.max()), 0.5)
    c -= np.float32(0.25) * a                    # a NumPy scalar on the left is CuPy's operator too
    s = cp.add.reduce(c, axis=0).sum()
    assert isinstance(b, standin.DeviceArray) and b.shape == (2, 2) and s.shape == ()
    np.testing.assert_allclose(cp.asnumpy(b), (np.arange(6.0).reshape(2, 3) * 2 + 1) @ np.arange(6.0).reshape(2, 3).T)
    assert a[1, 2].shape == () and float(a[1, 2]) == 5.0       # a[i, j] is a 0-d device view, as on CuPy
    assert [e.name for e in rec.events if e.kind == "xp"] == [
        "arange", "multiply", "add", "matmul", "maximum.reduce", "subtract", "exp", "maximum", "multiply",
        "subtract", "add.reduce", "add.reduce"]


def _avg_pool_forward(cp):
    """A forward pass of a small AvgPool2D net on the stand-in (kernels stubbed)."""
    from backends import replay_data, replay_net
    from gpucnn.layers import AvgPool2D

    model = replay_net(AvgPool2D).to("cuda")
    return model.forward(cp.asarray(replay_data()[0][:5]))


@pytest.mark.parametrize("plant", [
    lambda y: np.maximum(y, 0),                          # NumPy's namespace instead of the array module
    lambda y: y + np.zeros(y.shape, y.dtype),            # a host array in a device operation
    lambda y: y if np.isfinite(np.asarray(y)).all() else y,   # a debug check reading the device array
], ids=["np-ufunc", "host-operand", "np-asarray"])
def test_a_layer_computing_with_numpy_on_the_device_path_raises(cp, monkeypatch, plant):
    """Planted fault in gpucnn: average pooling's output passed through NumPy on the device path."""
    from gpucnn.functional import pooling

    real = pooling.avg_pool2d_forward
    assert isinstance(_avg_pool_forward(cp), standin.DeviceArray)
    monkeypatch.setattr(pooling, "avg_pool2d_forward", lambda x, k, s: (plant(real(x, k, s)[0]), tuple(x.shape)))
    with pytest.raises(TypeError, match="Implicit conversion|Unsupported type|was applied to a device array"):
        _avg_pool_forward(cp)
