"""``gpucnn export SOURCE --format onnx|safetensors --output FILE``.

``SOURCE`` is a run directory or a ``checkpoint.npz``; it is loaded with
:func:`gpucnn.checkpoint.restore_model`, which verifies its SHA-256.  The
format may be left out when ``FILE`` ends in ``.onnx`` or ``.safetensors``.
Exit status: 0 written; 2 bad input (unknown format, unusable or tampered
checkpoint, missing output directory, existing output without
``--overwrite``, a model that cannot be exported); 1 a runtime failure (the
``onnx`` package missing, an I/O error).  Errors are one line on stderr and
nothing is half-written (every file goes through ``atomic_open``).

Registered in :mod:`gpucnn.cli` as::

    p = sub.add_parser("export", help="export a checkpoint to ONNX or safetensors")
    add_arguments(p)
    p.set_defaults(func=lambda args, parser: run(args))
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("onnx", "safetensors")
_SUFFIXES = {".onnx": "onnx", ".safetensors": "safetensors"}
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PROG = "gpucnn export"


class _UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` command's arguments to ``parser``.

    Args:
        parser: the (sub)parser of ``gpucnn export``.

    Returns:
        The same parser.
    """
    parser.description = ("Export a checkpoint's model to ONNX (float32, symbolic batch) or to "
                          "safetensors under PyTorch nn.Sequential names.")
    parser.add_argument("source", metavar="SOURCE", help="run directory or checkpoint.npz (SHA-256 verified)")
    parser.add_argument("--format", "-f", choices=FORMATS, default=None,
                        help="output format (default: from the --output suffix, .onnx or .safetensors)")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (--format onnx only; default 17, IR version 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    return parser


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


def _resolve_format(fmt, output: Path) -> str:
    guessed = _SUFFIXES.get(output.suffix.lower())
    if fmt is None:
        if guessed is None:
            raise _UsageError(f"argument --format: required when --output {str(output)!r} does not end in "
                              f"{' or '.join(_SUFFIXES)}; choose from {', '.join(FORMATS)}")
        return guessed
    if fmt not in FORMATS:
        raise _UsageError(f"argument --format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if guessed is not None and guessed != fmt:
        raise _UsageError(f"argument --output: {str(output)!r} has the suffix of {guessed}, not of --format {fmt}")
    return fmt


def _check_opset(fmt: str, opset) -> int | None:
    from .onnx import DEFAULT_OPSET, IR_VERSION_FOR_OPSET

    if fmt != "onnx":
        if opset is not None:
            raise _UsageError(f"argument --opset: applies to --format onnx only (got {opset} with --format {fmt})")
        return None
    opset = DEFAULT_OPSET if opset is None else opset
    if opset not in IR_VERSION_FOR_OPSET:
        raise _UsageError(f"argument --opset: must be {min(IR_VERSION_FOR_OPSET)}..{max(IR_VERSION_FOR_OPSET)}, "
                          f"got {opset}")
    return opset


def _check_output(output: Path, overwrite: bool) -> Path:
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise _UsageError(f"argument --output: directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise _UsageError(f"argument --output: {str(parent)!r} is not a directory")
    if output.is_dir():
        raise _UsageError(f"argument --output: {str(output)!r} is a directory; give a file name")
    if output.exists() and not overwrite:
        raise _UsageError(f"argument --output: {str(output)!r} exists; pass --overwrite to replace it")
    return output


def _load_source(source, output: Path):
    from ..checkpoint import CheckpointError, resolve_path, restore_model

    if output.exists() and output.resolve() == resolve_path(source).resolve():
        raise _UsageError(f"argument --output: {str(output)!r} is the source checkpoint itself")
    try:
        return restore_model(source, device="cpu")
    except FileNotFoundError as exc:
        raise _UsageError(f"argument SOURCE: {exc}") from None
    except CheckpointError as exc:
        raise _UsageError(f"argument SOURCE: {exc}") from None


def _export(fmt: str, model, ckpt, output: Path, opset) -> str:
    """Write the file; returns the one-line summary."""
    from . import ExportError
    from .onnx import to_onnx
    from .safetensors import to_safetensors, torch_state_dict

    origin = f"{ckpt.model}, epoch {ckpt.epoch}, from {ckpt.path}"
    try:
        if fmt == "onnx":
            proto = to_onnx(model, output, opset=opset, model_name=ckpt.model)
            return (f"wrote {output} (onnx, opset {opset}, IR version {proto.ir_version}, "
                    f"{len(proto.graph.node)} nodes, {len(proto.graph.initializer)} initializers; {origin})")
        tensors = torch_state_dict(model)
        to_safetensors(model, output)
    except ExportError as exc:
        raise _UsageError(f"cannot export {ckpt.model}: {exc}") from None
    n_params = sum(int(a.size) for a in tensors.values())
    dtypes = ", ".join(sorted({str(a.dtype) for a in tensors.values()})) or "none"
    return (f"wrote {output} (safetensors, {len(tensors)} tensors, {n_params} parameters, {dtypes}, "
            f"PyTorch nn.Sequential names; {origin})")


def run(args) -> int:
    """Run ``gpucnn export`` with parsed ``args``; returns the exit status.

    Args:
        args: a namespace with ``source``, ``format`` (``None`` = from the
            output suffix), ``output``, ``opset`` (``None`` = 17) and ``overwrite``.

    Returns:
        0 when the file was written, 2 on bad input, 1 on a runtime failure;
        errors are printed as one line on stderr.
    """
    output = Path(args.output)
    try:
        fmt = _resolve_format(getattr(args, "format", None), output)
        opset = _check_opset(fmt, getattr(args, "opset", None))
        _check_output(output, bool(getattr(args, "overwrite", False)))
        model, ckpt = _load_source(args.source, output)
        summary = _export(fmt, model, ckpt, output, opset)
    except _UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ImportError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except OSError as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    print(summary, flush=True)
    return EXIT_OK


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m gpucnn.export.cli ...``) until ``gpucnn export`` is registered."""
    parser = add_arguments(argparse.ArgumentParser(prog=PROG))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
