# ---- cudasim (test-only CUDA emulator, tests/cudasim) ------------------------
# Puts tests/ on sys.path so tests (and the sanitizer subprocesses) can
# `from cudasim import load_module` however pytest was started.
import os as _os
import sys as _sys

_TESTS_DIR = _os.path.dirname(_os.path.abspath(__file__))
if _TESTS_DIR not in _sys.path:
    _sys.path.insert(0, _TESTS_DIR)
# ---- end cudasim --------------------------------------------------------------
