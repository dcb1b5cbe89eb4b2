"""gpucnn.export: ONNX (onnxruntime as the oracle) and safetensors (PyTorch as the oracle), and the CLI.

Every model runs on real MNIST test images; every row of the layer registry
(tests/layer_cases.py) is exported alone, to ONNX and through its PyTorch twin.  onnx/onnxruntime/torch/safetensors
are optional: the tests that need one skip cleanly without it.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import layers as L
from gpucnn.checkpoint import save_checkpoint
from gpucnn.export import ExportError, SafetensorsError
from gpucnn.export import cli as export_cli
from gpucnn.export import (build_onnx, load_safetensors, read_safetensors, to_onnx, to_safetensors,
                           torch_state_dict, write_safetensors)
from layer_cases import params as layer_params
from layer_cases import randomize, torch_twin

N_IMAGES = 300
RTOL, ATOL = 1e-4, 2e-5  # float32: gpucnn's im2col GEMMs vs the runtime's kernels


@pytest.fixture(scope="module")
def mnist():
    """(images, labels): the first N_IMAGES real MNIST test images, normalised NCHW float32."""
    ds = gc.data.load_dataset("mnist")
    return gc.data.normalize(ds.test_images[:N_IMAGES], "mnist"), ds.test_labels[:N_IMAGES]


def _built(name, seed=1):
    gc.seed(seed)
    return gc.models.build(name).eval()


def _assert_same_outputs(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)
    assert (actual.argmax(1) == expected.argmax(1)).all(), f"{what}: argmax differs"


class Weird(L.Layer):
    """A layer no exporter knows."""

    def forward(self, x):
        return x


def _custom_net():
    """Every activation, both pools, non-square kernels/strides/padding, PReLU with 1 and C slopes."""
    gc.seed(7)
    net = L.Sequential(
        L.Conv2D(1, 4, (3, 5), stride=(1, 2), padding=(2, 1)),  # (4, 30, 13)
        L.PReLU(4),                                              # per-channel slope on 4-D input
        L.MaxPool2D((3, 2), stride=(2, 1)),                      # (4, 14, 12)
        L.ScaledTanh(),
        L.Conv2D(4, 6, (2, 3), stride=(2, 1), padding=(0, 1), bias=False),  # (6, 7, 12)
        L.LeakyReLU(0.1),
        L.AvgPool2D((2, 3), stride=(1, 2)),                      # (6, 6, 5)
        L.Tanh(),
        L.PReLU(1),                                              # one shared slope
        L.Flatten(),                                             # 180
        L.Dense(180, 32),
        L.RReLU(0.1, 0.3),                                       # evaluation slope 0.2
        L.Dense(32, 16, bias=False),
        L.PReLU(16),                                             # per-feature slope on 2-D input
        L.Sigmoid(),
        L.Dense(16, 12),
        L.ReLU(),
        L.Dense(12, 10),
        L.Softmax(),
    )
    rng = np.random.default_rng(3)
    for layer in net.layers:
        if isinstance(layer, L.PReLU):  # distinct slopes, some negative, so a mis-broadcast shows
            layer.params["a"][...] = rng.uniform(-0.5, 0.8, layer.num_parameters).astype(np.float32)
        if "b" in layer.params:
            layer.params["b"][...] = rng.uniform(-0.2, 0.2, layer.params["b"].shape).astype(np.float32)
    return net.eval()


# -- ONNX ----------------------------------------------------------------------------------


def _ort_run(path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.mark.parametrize("name", gc.models.MODELS)
def test_onnx_builtin_model_matches_forward(tmp_path, mnist, name):
    onnx = pytest.importorskip("onnx")
    model = _built(name)
    path = tmp_path / f"{name}.onnx"
    to_onnx(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x, _ = mnist
    expected = model.forward(x)
    _assert_same_outputs(_ort_run(path, x), expected, name)
    np.testing.assert_allclose(_ort_run(path, x[:1]), expected[:1], rtol=RTOL, atol=ATOL)  # symbolic batch


def test_onnx_custom_net_every_activation(tmp_path, mnist):
    onnx = pytest.importorskip("onnx")
    net = _custom_net()
    path = tmp_path / "custom.onnx"
    proto = to_onnx(net, path, model_name="custom")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "MaxPool", "AveragePool", "Flatten", "Gemm", "Relu", "Sigmoid", "Tanh", "Mul",
            "LeakyRelu", "PRelu", "Softmax"} <= ops
    slopes = {i.name: tuple(i.dims) for i in proto.graph.initializer if i.name.endswith(".weight")}
    assert slopes["1.weight"] == (4, 1, 1) and slopes["8.weight"] == (1,) and slopes["13.weight"] == (16,)
    x, _ = mnist
    _assert_same_outputs(_ort_run(path, x), net.forward(x), "custom net")


def test_onnx_graph_versions_and_signature(tmp_path):
    onnx = pytest.importorskip("onnx")
    proto = to_onnx(_built("lenet5"), tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert m.ir_version == 8 == proto.ir_version
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 17)]
    (inp,), (out,) = m.graph.input, m.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == "input" and dims(inp) == ["N", 1, 28, 28]
    assert out.name == "output" and dims(out) == ["N", 10]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in m.graph.initializer)
    assert {p.key: p.value for p in m.metadata_props}["gpucnn_model"] == "lenet5"
    assert m.graph.node[0].op_type == "Conv"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in m.graph.node[0].attribute}
    assert attrs["pads"] == [2, 2, 2, 2] and attrs["group"] == 1


def test_onnx_ir_table_matches_onnx():
    onnx = pytest.importorskip("onnx")
    from gpucnn.export.onnx import IR_VERSION_FOR_OPSET

    for opset, ir in IR_VERSION_FOR_OPSET.items():
        assert onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)]) == ir, opset


def test_onnx_float64_model_is_cast_to_float32(tmp_path, mnist):
    onnx = pytest.importorskip("onnx")
    gc.seed(1)
    model = gc.models.build("seed001", dtype=np.float64).eval()
    proto = to_onnx(model, tmp_path / "m.onnx")
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in proto.graph.initializer)
    x, _ = mnist
    _assert_same_outputs(_ort_run(tmp_path / "m.onnx", x), model.forward(x.astype(np.float64)), "float64 model")


def test_onnx_unmappable_layer_refused_by_name(tmp_path):
    pytest.importorskip("onnx")
    net = L.Sequential(L.Conv2D(1, 2, 3), L.ReLU(), Weird(), L.Flatten())
    with pytest.raises(ExportError, match=r"layer 2 \(Weird\) has no ONNX mapping"):
        to_onnx(net, tmp_path / "w.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_onnx_bad_arguments():
    pytest.importorskip("onnx")
    model = _built("lenet5")
    with pytest.raises(ValueError, match="opset must be an int in 13..21, got opset=11"):
        build_onnx(model, opset=11)
    with pytest.raises(ExportError, match=r"layer 0 \(Conv2D\): in_channels=1 but its input has 3 channels"):
        build_onnx(model, input_shape=(3, 28, 28))
    with pytest.raises(ExportError, match=r"layer 7 \(Dense\): expects input \(N, 400\)"):
        build_onnx(model, input_shape=(1, 32, 32))
    with pytest.raises(TypeError, match="Sequential"):
        build_onnx(model.layers[0])


def test_onnx_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'gpucnn\[onnx\]'"):
        build_onnx(_built("lenet5"))


# -- safetensors with PyTorch ----------------------------------------------------------------


def _torch_sequential(model):
    """The same architecture as ``model``, built independently as torch.nn.Sequential (the
    registry's PyTorch twins, tests/layer_cases.py), weights left to load."""
    pytest.importorskip("torch")
    return torch_twin(model, copy=False).eval()


def _torch_forward(tm, x):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return tm(torch.from_numpy(x)).numpy()


def _fresh(name):
    return gc.models.build(name).eval() if isinstance(name, str) else name().eval()


@pytest.mark.parametrize("name", [*gc.models.MODELS, pytest.param(_custom_net, id="custom")])
def test_safetensors_round_trip_through_torch(tmp_path, mnist, name):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    model = _built(name) if isinstance(name, str) else name()
    x, _ = mnist
    to_safetensors(model, tmp_path / "g.safetensors")
    tm = _torch_sequential(model)
    tm.load_state_dict(st.load_file(str(tmp_path / "g.safetensors")), strict=True)  # gpucnn -> torch
    _assert_same_outputs(_torch_forward(tm, x), model.forward(x), "gpucnn -> torch")
    st.save_file(tm.state_dict(), str(tmp_path / "t.safetensors"))  # torch -> gpucnn, written by safetensors
    back = _fresh(name)
    load_safetensors(back, tmp_path / "t.safetensors")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)
    torch.manual_seed(5)  # fresh torch weights: a file torch wrote loads into gpucnn and runs the same
    tm2 = _torch_sequential(model)
    st.save_file(tm2.state_dict(), str(tmp_path / "t2.safetensors"))
    other = _fresh(name)
    load_safetensors(other, tmp_path / "t2.safetensors")
    _assert_same_outputs(other.forward(x), _torch_forward(tm2, x), "torch -> gpucnn")


def test_safetensors_metadata_and_layout(tmp_path):
    st = pytest.importorskip("safetensors")
    model = _built("lenet5")
    to_safetensors(model, tmp_path / "m.safetensors")
    with st.safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        assert f.metadata()["gpucnn_model"] == "lenet5" and f.metadata()["format"] == "pt"
        assert sorted(f.keys()) == sorted(torch_state_dict(model))
    tensors, meta = read_safetensors(tmp_path / "m.safetensors")
    assert meta["gpucnn_model"] == "lenet5" and list(tensors)[:2] == ["0.weight", "0.bias"]
    np.testing.assert_array_equal(tensors["11.weight"], model.layers[11].params["W"])
    n = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])[0]
    assert n % 8 == 0


def test_safetensors_strict_errors_name_every_problem(tmp_path):
    model = _built("lenet5")
    tensors = torch_state_dict(model)
    del tensors["0.bias"]
    tensors["99.weight"] = np.zeros(3, np.float32)
    tensors["3.weight"] = np.zeros((16, 6, 3, 3), np.float32)
    tensors["7.bias"] = tensors["7.bias"].astype(np.float64)
    write_safetensors(tmp_path / "bad.safetensors", tensors, {"gpucnn_model": "lenet5"})
    target = _built("lenet5", seed=9)
    before = target.state_dict()
    with pytest.raises(ExportError) as info:
        load_safetensors(target, tmp_path / "bad.safetensors")
    msg = str(info.value)
    assert "missing tensors ['0.bias']" in msg and "unexpected tensors ['99.weight']" in msg
    assert "'3.weight': shape (16, 6, 3, 3) in the file, (16, 6, 5, 5) in the model" in msg
    assert "'7.bias': dtype float64 (F64) in the file, float32 (F32) in the model" in msg
    assert "nothing was loaded" in msg
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed although the load failed")


def test_safetensors_other_architecture_refused(tmp_path):
    to_safetensors(_built("lenet5"), tmp_path / "m.safetensors")
    with pytest.raises(ExportError, match=r"model 'seed001' \(the file holds gpucnn model 'lenet5'\)"):
        load_safetensors(_built("seed001"), tmp_path / "m.safetensors")


def _file(header, data=b"", raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content,fragment", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10_000) + b"{}", "header length 10000 does not fit the file of 10 bytes"),
    (_file(None, raw_header=b"[1, 2]"), "header must be a JSON object starting with '{'"),
    (_file(None, raw_header=b"{not json"), "header is not valid JSON"),
    (_file(None, raw_header=b'{"a": 1, "a": 2}'), "duplicate keys ['a']"),
    (_file({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    (_file({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "dtype 'BF16' is not supported"),
    (_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     "F32 shape [3] needs 12 bytes, but data_offsets [0, 8] span 8"),
    (_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "leaves a gap of 4 bytes"),
    (_file({"w": F32_2, "v": F32_2}, b"\0" * 16), "overlaps the previous tensor"),
    (_file({"w": F32_2}, b"\0" * 4), "run past the 4 bytes after the header"),
    (_file({"w": F32_2}, b"\0" * 12), "do not cover the 12 bytes after the header"),
    (_file({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "shape must be a list of non-negative ints"),
    (_file({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "entry must have exactly dtype, shape, data_offsets"),
])
def test_safetensors_invalid_files_refused(tmp_path, content, fragment):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match="not a valid safetensors file") as info:
        read_safetensors(path)
    assert fragment in str(info.value)


def test_safetensors_deeply_nested_header_refused_before_parsing(tmp_path):
    """100k nested brackets: a SafetensorsError, not a RecursionError; brackets inside strings do not count."""
    path = tmp_path / "deep.safetensors"
    path.write_bytes(_file(None, raw_header=b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    with pytest.raises(SafetensorsError, match=r"deep\.safetensors: not a valid safetensors file: header JSON "
                                               r"nests 100001 levels deep, more than the 64 allowed"):
        read_safetensors(path)
    path.write_bytes(_file(None, raw_header=b'{"x": "' + b"[" * 100_000 + b'"}'))
    with pytest.raises(SafetensorsError, match="entry must have exactly dtype, shape, data_offsets"):
        read_safetensors(path)


def test_safetensors_reads_every_plain_dtype(tmp_path):
    arrays = {"f64": np.arange(3, dtype=np.float64), "i64": np.array([1, -2], np.int64),
              "u8": np.array([[7]], np.uint8), "b": np.array([True, False]), "empty": np.zeros((0, 4), np.float32),
              "scalar": np.array(2.5, np.float32), "be": np.arange(4, dtype=">f4")}
    write_safetensors(tmp_path / "d.safetensors", arrays)
    got, meta = read_safetensors(tmp_path / "d.safetensors")
    assert meta == {} and list(got) == list(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got[k].dtype == v.dtype.newbyteorder("=") and got[k].flags.writeable
    st = pytest.importorskip("safetensors.numpy")
    np.testing.assert_array_equal(st.load_file(str(tmp_path / "d.safetensors"))["be"], arrays["be"])


@pytest.mark.parametrize("filename", ["weights.pt", "weights.pth", "weights.bin", "weights.safetensors"])
def test_pickle_files_refused_with_hint(tmp_path, filename):
    torch = pytest.importorskip("torch")
    tm = _torch_sequential(_built("seed002_c1"))
    torch.save(tm.state_dict(), str(tmp_path / filename))  # a zip of pickles, whatever the name says
    with pytest.raises(SafetensorsError) as info:
        load_safetensors(_built("seed002_c1"), tmp_path / filename)
    msg = str(info.value)
    assert "\n" not in msg and "never unpickles" in msg
    assert 'safetensors.torch.save_file(model.state_dict(), "weights.safetensors")' in msg


def test_unknown_layer_refused_by_safetensors(tmp_path):
    net = L.Sequential(L.Flatten(), Weird(), L.Dense(784, 10))
    with pytest.raises(ExportError, match=r"layer 1 \(Weird\) has no safetensors naming"):
        to_safetensors(net, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- every row of the layer registry (tests/layer_cases.py) ------------------------------------


def _row_net(case, seed=0):
    """The row's layer (random parameters and statistics) in a Sequential, in evaluation mode."""
    layer = randomize(case.make(), np.random.default_rng(seed))
    return (layer if isinstance(layer, L.Sequential) else L.Sequential(layer)).eval()


@pytest.mark.parametrize("case", layer_params())
def test_layer_case_onnx(tmp_path, case):
    """Each row exports (float32) and runs in onnxruntime as its float64 forward does; a row that
    says it has no mapping is refused by name."""
    onnx = pytest.importorskip("onnx")
    net, shape = _row_net(case), case.shapes[0]
    path = tmp_path / "m.onnx"
    if not case.onnx:
        with pytest.raises(ExportError, match="has no ONNX mapping"):
            to_onnx(net, path, input_shape=shape[1:])
        return
    to_onnx(net, path, input_shape=shape[1:])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = case.x(shape, seed=3)
    np.testing.assert_allclose(_ort_run(path, x.astype(np.float32)), net.forward(x), rtol=RTOL, atol=ATOL,
                               err_msg=case.id)


@pytest.mark.parametrize("case", layer_params())
def test_layer_case_safetensors_through_torch(tmp_path, case):
    """Each row's tensors load strictly into its PyTorch twin, which then computes the same (float64);
    the file torch writes back loads into gpucnn bit for bit."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    net, shape = _row_net(case), case.shapes[0]
    if not case.safetensors:
        with pytest.raises(ExportError, match="has no safetensors naming"):
            to_safetensors(net, tmp_path / "g.safetensors")
        return
    to_safetensors(net, tmp_path / "g.safetensors")
    tm = torch_twin(net, copy=False)
    tm.load_state_dict(st.load_file(str(tmp_path / "g.safetensors")), strict=True)
    x = case.x(shape, seed=4)
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.from_numpy(x)).numpy(), net.forward(x), rtol=1e-10, atol=1e-12,
                                   err_msg=case.id)
    st.save_file(tm.state_dict(), str(tmp_path / "t.safetensors"))
    back = _row_net(case, seed=1)
    load_safetensors(back, tmp_path / "t.safetensors")
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=f"{case.id} {k}")


# -- the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist):
    """A run directory with a lenet5 checkpoint trained for a few SGD steps on real images."""
    gc.seed(11)
    model = gc.models.build("lenet5")
    opt = gc.optim.SGD(model, lr=0.05)
    loss = gc.losses.SoftmaxCrossEntropy()
    x, y = mnist
    for i in range(3):
        loss.forward(model.forward(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32])
        model.backward(loss.backward(), input_grad=False)
        opt.step()
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d, model, None, model_name="lenet5", epoch=1, config={"dataset": "mnist"})
    return d


def _export_registered() -> bool:
    from gpucnn import cli

    parser = cli.build_parser(["export"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "export" in sub.choices


def _cli(argv, capsys):
    """(exit status, stdout, stderr) of ``gpucnn export ARGV``."""
    capsys.readouterr()
    try:
        if _export_registered():
            from gpucnn import cli

            rc = cli.main(["export", *map(str, argv)])
        else:
            parser = export_cli.add_arguments(argparse.ArgumentParser(prog="gpucnn export"))
            rc = export_cli.run(parser.parse_args(list(map(str, argv))))
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_onnx(run_dir, tmp_path, mnist, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out_file = tmp_path / "lenet5.onnx"
    rc, out, err = _cli([run_dir, "--format", "onnx", "--output", out_file], capsys)
    assert rc == 0, err
    assert str(out_file) in out and "onnx, opset 17, IR version 8" in out and "lenet5, epoch 1" in out
    model, _ = gc.checkpoint.restore_model(run_dir)
    x, _ = mnist
    _assert_same_outputs(_ort_run(out_file, x), model.eval().forward(x), "CLI onnx")


def test_cli_safetensors_format_from_suffix(run_dir, tmp_path, capsys):
    out_file = tmp_path / "w.safetensors"
    rc, out, err = _cli([run_dir / "checkpoint.npz", "-o", out_file], capsys)
    assert rc == 0, err
    assert f"wrote {out_file} (safetensors, 10 tensors, 61706 parameters, float32" in out
    model, _ = gc.checkpoint.restore_model(run_dir)
    back = gc.models.build("lenet5")
    load_safetensors(back, out_file)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)


@pytest.fixture()
def tampered(run_dir, tmp_path):
    """A copy of the checkpoint with one weight changed and the digest left alone."""
    with np.load(run_dir / "checkpoint.npz", allow_pickle=False) as z:
        files = {k: z[k] for k in z.files}
    files["param/0.W"] = files["param/0.W"] + np.float32(1)
    np.savez(tmp_path / "tampered.npz", **files)
    return tmp_path / "tampered.npz"


def test_cli_refuses_tampered_checkpoint(tampered, tmp_path, capsys):
    rc, out, err = _cli([tampered, "-f", "onnx", "-o", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "SHA-256 mismatch" in err and err.count("\n") == 1 and out == ""
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("args,fragment", [
    (["{run}", "-f", "tflite", "-o", "{tmp}/m.tflite"], "invalid choice: 'tflite'"),
    (["{run}", "-o", "{tmp}/m.weights"], "--format: required when --output"),
    (["{run}", "-f", "onnx", "-o", "{tmp}/m.safetensors"], "has the suffix of safetensors, not of --format onnx"),
    (["{run}", "-f", "onnx", "-o", "{tmp}/nowhere/m.onnx"], "directory '{tmp}/nowhere' does not exist"),
    (["{run}", "-f", "safetensors", "--opset", "17", "-o", "{tmp}/m.safetensors"], "--opset: applies to --format onnx"),
    (["{run}", "--opset", "9", "-o", "{tmp}/m.onnx"], "--opset: must be 13..21, got 9"),
    (["{tmp}/missing", "-o", "{tmp}/m.onnx"], "checkpoint not found"),
    (["{run}", "-f", "onnx", "-o", "{tmp}"], "is a directory; give a file name"),
])
def test_cli_bad_input(run_dir, tmp_path, capsys, args, fragment):
    fill = lambda s: s.format(run=run_dir, tmp=tmp_path)  # noqa: E731
    rc, out, err = _cli([fill(a) for a in args], capsys)
    assert rc == 2, (out, err)
    assert fill(fragment) in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing (half-)written


def test_cli_existing_output_needs_overwrite(run_dir, tmp_path, capsys):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"keep me")
    rc, _, err = _cli([run_dir, "-o", target], capsys)
    assert rc == 2 and "exists; pass --overwrite" in err and target.read_bytes() == b"keep me"
    rc, out, err = _cli([run_dir, "-o", target, "--overwrite"], capsys)
    assert rc == 0, err
    assert target.read_bytes() != b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_cli_never_overwrites_its_source(run_dir, capsys):
    src = run_dir / "checkpoint.npz"
    before = src.read_bytes()
    rc, _, err = _cli([src, "-f", "safetensors", "-o", src, "--overwrite"], capsys)
    assert rc == 2 and "is the source checkpoint itself" in err and src.read_bytes() == before


def test_cli_missing_onnx_is_a_runtime_failure(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    rc, out, err = _cli([run_dir, "-o", tmp_path / "m.onnx"], capsys)
    assert rc == 1 and "pip install 'gpucnn[onnx]'" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_registration_recipe(run_dir, tmp_path, capsys, monkeypatch):
    """``gpucnn.cli.main(["export", ...])`` works when registered as gpucnn/cli.py is meant to."""
    from gpucnn import cli

    if not _export_registered():
        original = cli.build_parser

        def build_parser(argv=()):
            parser = original(argv)
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            p = sub.add_parser("export", help="export a checkpoint to ONNX or safetensors")
            export_cli.add_arguments(p)
            p.set_defaults(func=lambda args, parser: export_cli.run(args))
            return parser

        monkeypatch.setattr(cli, "build_parser", build_parser)
    out_file = tmp_path / "m.safetensors"
    assert cli.main(["export", str(run_dir), "-o", str(out_file)]) == 0
    assert "safetensors, 10 tensors" in capsys.readouterr().out
    assert cli.main(["export", str(run_dir), "-o", str(out_file)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["export", str(run_dir), "-f", "tflite", "-o", str(tmp_path / "x")])
    assert info.value.code == 2
