"""One activation header for the kernels: kernels/activation.cuh, expanded in place by sources.py.

* conv_forward.cu, dense.cu, elementwise.cu and pool.cu ``#include
  "activation.cuh"``, the tensor-core modules get it through gemm_tc.cuh (their
  fused epilogue), and no ``kernels/*.cu`` holds a copy of the activation
  maths (its tell-tale expressions, found in the header itself, are found in
  no kernel file);
* :func:`gpucnn.cuda.sources.read_source` expands the include: every line of
  the expanded text sits under the ``#line`` directive of the file and line
  it comes from, and a bad include is refused naming it;
* an edit of the header changes the code the loader hands its module builder
  for every kernel file that includes it, and only for those (CuPy's on-disk
  cache and the emulator's are keyed on that code), and the emulator runs the
  edited maths (no stale module).
"""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from gpucnn.cuda import loader, sources

HEADER = "activation.cuh"
INCLUDERS = ("conv_forward.cu", "dense.cu", "elementwise.cu", "pool.cu")
#: The tensor-core modules: their epilogue applies the activation, through kernels/gemm_tc.cuh.
VIA_GEMM_TC = ("gemm_tc_3xtf32.cu", "gemm_tc_bf16.cu", "gemm_tc_f16.cu", "gemm_tc_tf32.cu")
USERS = set(INCLUDERS) | set(VIA_GEMM_TC)
#: What an includer includes besides the activation header, in order (kernels/opaque.cuh: the
#: gather base pointer of conv_forward's im2col).
OTHER_HEADERS = {"conv_forward.cu": (HEADER, "opaque.cuh")}

#: Expressions of the activation rules: only kernels/activation.cuh may hold them.
TELLTALES = {
    "tanh": r"\btanhf?\s*\(",
    "relu's NaN rule (z == z ? 0 : z)": r"\b(\w+)\s*==\s*\1\s*\?",
    "relu's 1/2 at 0": r"\(T\)\s*0\.5\b|\bT\s*\(\s*0\.5\s*\)|\b0\.5f?\b",
    "sigmoid's exp(-|z|)": r"\w*ex\w*\s*\(\s*-\s*[\w:<>]*ab\w*\s*\(",
    "sigmoid' y (1 - y)": r"\b(\w+)\s*\*\s*\(\s*(?:\(T\)\s*|T\s*\()?1\)?\s*-\s*\1\s*\)",
    "tanh' 1 - y^2": r"(?:\(T\)\s*|T\s*\()?1\)?\s*-\s*(\w+)\s*\*\s*\1\b",
}


def _code(text: str) -> str:
    """``text`` without its comments."""
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _raw(name: str) -> str:
    return (sources.kernel_dir() / name).read_text(encoding="utf-8")


def test_the_header_holds_every_telltale():
    """The patterns below find the maths where it is (so the next test can fail)."""
    code = _code(_raw(HEADER))
    for what, pattern in TELLTALES.items():
        assert re.search(pattern, code), f"kernels/{HEADER} no longer matches the {what} pattern {pattern!r}"


@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_no_kernel_keeps_its_own_copy_of_the_activation_maths(filename):
    code = _code(_raw(filename))
    for what, pattern in TELLTALES.items():
        found = re.search(pattern, code)
        assert found is None, (f"kernels/{filename} computes {what} itself ({found.group()!r}); "
                               f"use kernels/{HEADER}'s activation / activation_backward / relu_grad")


@pytest.mark.parametrize("filename", INCLUDERS)
def test_activation_kernels_include_the_shared_header(filename):
    assert re.search(rf'^#include "{re.escape(HEADER)}"', _raw(filename), re.M), \
        f'kernels/{filename} does not #include "{HEADER}"'
    assert sources.included_headers(filename) == OTHER_HEADERS.get(filename, (HEADER,))
    assert not re.search(r"^[ \t]*#[ \t]*include\b", sources.read_source(filename), re.M)


def test_only_the_activation_kernels_include_it():
    including = {f for f in loader.KERNEL_FILES if HEADER in sources.included_headers(f)}
    assert including == USERS


@pytest.mark.parametrize("filename", VIA_GEMM_TC)
def test_the_tensor_core_modules_get_it_through_their_one_core(filename):
    assert re.findall(r'^#include "([^"]+)"', _raw(filename), re.M) == ["gemm_tc.cuh"]
    assert re.search(rf'^#include "{re.escape(HEADER)}"', _raw("gemm_tc.cuh"), re.M)


@pytest.mark.parametrize("filename", sorted(USERS))
def test_every_expanded_line_sits_under_the_line_directive_of_its_file(filename):
    """Compiler errors name kernels/<file>(<line>): check the mapping for every line, nested
    headers included."""
    names = (filename, *sources.included_headers(filename))
    files = {name: _raw(name).splitlines() for name in names}
    where, number, checked = None, 0, 0
    for line in sources.read_source(filename).splitlines():
        m = re.fullmatch(r'#line (\d+) "kernels/([^"]+)"', line)
        if m:
            where, number = m.group(2), int(m.group(1))
            continue
        assert where in files, f"a line before any #line directive, or of an unknown file: {line!r}"
        assert files[where][number - 1] == line, f"kernels/{where}:{number} is {files[where][number - 1]!r}, " \
                                                 f"the expanded text has {line!r} there"
        number += 1
        checked += 1
    includes = sum(1 for lines in files.values() for line in lines if re.match(r'#include "', line))
    assert checked == sum(len(lines) for lines in files.values()) - includes   # all but the #include lines


def test_expansion_refuses_what_is_not_a_kernel_header(tmp_path):
    (tmp_path / "a.cuh").write_text("int a;\n")
    (tmp_path / "b.h").write_text("int b;\n")
    for include in ("missing.cuh", "../a.cuh", "b.h"):
        with pytest.raises(ValueError, match=rf'kernels/k\.cu:2: #include "{re.escape(include)}" names no header'):
            sources.expand_includes("k.cu", f'int k;\n#include "{include}"\n', tmp_path)


def test_a_header_is_expanded_once_and_nested_headers_too(tmp_path):
    (tmp_path / "a.cuh").write_text('#include "b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("int b;")                           # no final newline
    text = sources.expand_includes("k.cu", '#include "a.cuh"\n#include "b.cuh"\nint k;\n', tmp_path)
    assert text == ('#line 1 "kernels/a.cuh"\n'
                    '#line 1 "kernels/b.cuh"\nint b;\n#line 2 "kernels/a.cuh"\n'
                    'int a;\n#line 2 "kernels/k.cu"\n'
                    '\n'                                                  # b.cuh again: a blank line
                    'int k;\n')


@pytest.fixture
def kernel_copy(tmp_path, monkeypatch):
    """A copy of kernels/ that sources.py reads instead of the real one (caches cleared around)."""
    copy = tmp_path / "kernels"
    shutil.copytree(sources.kernel_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sources, "_candidate_dirs", lambda: [copy])
    loader.clear_cache()
    yield copy
    loader.clear_cache()


def _edit_header(copy, old, new):
    path = copy / HEADER
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), encoding="utf-8")
    loader.clear_cache()


def test_a_header_edit_changes_the_code_of_every_kernel_that_includes_it(kernel_copy):
    """The loader's builder receives the expanded text: CuPy keys its on-disk cache on it (and
    the emulator its .so), so an edited header cannot be served from a stale cache."""
    def compiled():
        with loader.use_module_builder(lambda code, name, options: code):
            return {f: loader.get_module(f) for f in loader.KERNEL_FILES}

    before = compiled()
    _edit_header(kernel_copy, "(T)1 - s * s", "(T)2 - s * s")
    after = compiled()
    changed = {f for f in loader.KERNEL_FILES if before[f] != after[f]}
    assert changed == {f for f in loader.KERNEL_FILES if HEADER in sources.included_headers(f)}
    assert changed == USERS


@pytest.mark.cudasim
def test_the_emulator_runs_the_edited_header(kernel_copy):
    cudasim = pytest.importorskip("cudasim")
    if shutil.which(cudasim.CXX) is None:
        pytest.skip(f"the emulator needs a C++ compiler ({cudasim.CXX})")
    rng = np.random.default_rng(23)
    dy, y = rng.standard_normal(40), np.tanh(rng.standard_normal(40))

    def tanh_backward():
        dz = np.full(40, np.nan)
        with loader.use_module_builder(cudasim.load_module):
            loader.launch("act_backward_f64", (dy, y, dz, 40, 3), n_threads=40)
        return dz

    np.testing.assert_array_equal(tanh_backward(), dy * (1 - y * y))
    _edit_header(kernel_copy, "(T)1 - s * s", "(T)2 - s * s")
    np.testing.assert_array_equal(tanh_backward(), dy * (2 - y * y))
