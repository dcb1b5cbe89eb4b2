"""The ``gpucnn`` command line (also ``python -m gpucnn``).

Commands::

    gpucnn train     [--model lenet5] [--epochs 3] [--device auto] [--out DIR] ...
    gpucnn evaluate  CHECKPOINT                 # accuracy, per-class accuracy, confusion matrix
    gpucnn predict   CHECKPOINT IMAGE [IMAGE...] # drawings, scans, MNIST-style: class + probabilities
    gpucnn export    CHECKPOINT --format onnx|safetensors --output FILE
    gpucnn plot      DIR                         # DIR/curves.png, filters.png, features.png, confusion.png, gradflow.png
    gpucnn bench     ...                         # gpucnn/bench.py

``gpucnn train`` writes, in its run directory (``--out``, default
``runs/<model>-<YYYYmmdd-HHMMSS>``): ``checkpoint.npz`` (after every epoch,
atomically; see :mod:`gpucnn.checkpoint`), ``metrics.jsonl`` (one JSON object
per epoch: ``epoch``, ``train_loss``, ``train_accuracy``, ``test_loss``,
``test_accuracy`` (fractions 0-1), ``lr`` (at the epoch's first step),
``lr_end``, ``images_per_sec`` (training throughput), ``train_seconds``,
``seconds`` (the whole epoch: training, evaluation, checkpoint), ``device``),
``layers.jsonl`` (per-layer norms every ``--log-every`` steps) and
``config.json``; with ``--tensorboard [DIR]`` TensorBoard event files
(:mod:`gpucnn.train.watch`).  The last line it prints is a one-line summary::

    done: lenet5 on mnist, 3 epochs, test accuracy 99.11%, 7814 images/s (cpu), 28.1 s, checkpoint runs/lenet5-.../checkpoint.npz

``--resume DIR`` continues a run up to ``--epochs`` in total, bit for bit on
the CPU; the cosine schedule depends on ``--epochs``, so stop a run early with
``--stop-after N`` (or an interruption) rather than a smaller ``--epochs``
when the continuation must equal an uninterrupted run.

``CHECKPOINT`` is a ``checkpoint.npz`` file or the run directory holding it.
Exit status: 0 success, 1 runtime failure (data, I/O, a full disk), 2 bad
arguments, an unusable checkpoint or a run directory in use by another run,
3 training stopped on a NaN/Inf loss, 130 interrupted (Ctrl-C), 143 stopped by
SIGTERM (128 + the signal's number, as a shell reports a process the signal
ended; the checkpoint is handled as on Ctrl-C), 141 (128 + SIGPIPE, as a Unix
tool killed by it) when the reader of standard output went away
(``gpucnn predict ... | head -1``), with nothing printed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from . import models
from . import precision as precision_mod
from ._io import EXIT_BROKEN_PIPE, stdout_closed, stdout_gone  # noqa: F401 - EXIT_BROKEN_PIPE: exit statuses live here

EXIT_FAILURE, EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM

# -- argument types (argparse turns the ValueError/ArgumentTypeError into "argument --x: ...") --


def _precision(s: str) -> str:
    """A precision mode (a bad one is answered with the list of modes)."""
    try:
        return precision_mod.check_mode(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s!r}")
    return v


def _float_in(lo, hi, lo_open, hi_open, what):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}") from None
        ok = v == v and v not in (float("inf"), float("-inf"))
        ok = ok and (v > lo if lo_open else v >= lo)
        if hi is not None:
            ok = ok and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v

    return parse


_positive_float = _float_in(0.0, None, True, False, "a positive number")
_nonneg_float = _float_in(0.0, None, False, False, "a number >= 0")
_momentum = _float_in(0.0, 1.0, False, True, "in [0, 1)")
_gamma = _float_in(0.0, 1.0, True, False, "in (0, 1]")

def _add_train(sub):
    from .data import DATASET_NAMES
    from .train.watch import DEFAULT_LOG_EVERY

    p = sub.add_parser(
        "train", help="train a model (default: LeNet-5 on MNIST)",
        description="Train a model, evaluating on the test set and checkpointing after every epoch. "
                    "Writes DIR/checkpoint.npz, DIR/metrics.jsonl (one JSON object per epoch), "
                    "DIR/layers.jsonl (per-layer statistics every --log-every steps) and DIR/config.json "
                    "(and DIR/tb with --tensorboard); the last line printed is a one-line summary.")
    # Defaults are None so that --resume can tell what was given; the real
    # defaults are TrainConfig's and shown in the help through `default=` text.
    p.add_argument("--model", choices=models.MODELS, default=None, help="network (default: lenet5)")
    p.add_argument("--dataset", choices=DATASET_NAMES, default=None,
                   help="dataset (default: folder when --data-dir is an image folder, else mnist); cifar10 is "
                        "downloaded into the cache; folder: your own images in --data-dir")
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="PIXELS",
                   help="image folders: resize (aspect kept) and centre-crop to PIXELS x PIXELS (default: the "
                        "most common size in the folder)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="image folders: 1 (gray) or 3 (RGB) (default: 1 when every image is gray, else 3)")
    p.add_argument("--val-split", type=_float_in(0, 1, True, True, "a fraction"), default=None, metavar="FRACTION",
                   help="image folders without train/ and test/: hold out FRACTION of every class for testing "
                        "(fixed by --seed)")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="image folders: leave out the files that cannot be decoded (named, and counted) instead "
                        "of stopping")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="with --augment, mirror half the images left-right (default: per dataset; on for "
                        "fashion-mnist and cifar10)")
    p.add_argument("--max-shift", type=_nonneg_int, default=None, metavar="PIXELS",
                   help="with --augment, the largest random shift (crop with padding) per axis (default: per "
                        "dataset: 2 for MNIST, 4 for cifar10, 1/14 of an image folder's side)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding the dataset files (else $GPUCNN_DATA, the copy shipped "
                        "with gpucnn for MNIST, the cache ~/.cache/gpucnn, or a download)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default) = cuda when CuPy sees a GPU, else cpu")
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs in total (default: 3)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="minibatch size (default: 64)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="optimizer (default: sgd)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 0.05 for sgd, 0.001 for adam; sgd on the sigmoid "
                        "networks: 1.0 for zhang2016, 0.2 for seed002_c1/c2)")
    p.add_argument("--lr-schedule", choices=("constant", "step", "cosine"), default=None,
                   help="constant; step: lr * gamma^(epoch // lr-step); cosine (per step, to 0 at the "
                        "end of --epochs) (default: cosine)")
    p.add_argument("--lr-step", type=_positive_int, default=None, help="epochs per decay, step schedule (default: 2)")
    p.add_argument("--lr-gamma", type=_gamma, default=None, help="decay factor, step schedule (default: 0.1)")
    p.add_argument("--warmup", type=_nonneg_float, default=None, metavar="EPOCHS",
                   help="linear learning-rate warm-up over this many epochs (default: 0.25; 0: none)")
    p.add_argument("--momentum", type=_momentum, default=None, help="SGD momentum (default: 0.9 for sgd)")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None, help="L2 weight decay (default: 2e-3 for sgd, 0 for adam and for "
                        "the sigmoid networks)")
    p.add_argument("--seed", type=_nonneg_int, default=None, help="random seed (default: 0)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="shift each training image by up to 2 pixels (and mirror half of them on "
                        "fashion-mnist), deterministic for the seed (default: on for lenet5 and resnet_mini, off otherwise)")
    p.add_argument("--subset", type=_positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--test-subset", type=_positive_int, default=None, metavar="N",
                   help="evaluate on the first N test images only")
    p.add_argument("--eval-batch-size", type=_positive_int, default=None, help="evaluation batch size (default: 1000)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default: runs/<model>-<YYYYmmdd-HHMMSS>; with --resume, the resumed directory)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to be a directory that holds a checkpoint")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR (or from a checkpoint file) up to --epochs in total")
    p.add_argument("--stop-after", type=_positive_int, default=None, metavar="EPOCH",
                   help="stop after this epoch, as if interrupted (continue later with --resume)")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (Nsight Systems)")
    p.add_argument("--debug", action="store_true", help="anomaly detection: name the first layer producing NaN/Inf")
    p.add_argument("--precision", type=_precision, default="fp32", metavar="{" + ",".join(precision_mod.MODES) + "}",
                   help="the arithmetic of the conv and dense GEMMs: fp32 (default, exact), tf32 or bf16 "
                        "(operands rounded to nearest even, FP32 accumulation and master weights), 3xtf32 "
                        "(split TF32, about FP32 accuracy), fp16 (operands rounded to IEEE half, with dynamic "
                        "loss scaling: an overflowing step is skipped and the scale halved; the scale and the "
                        "skipped steps are in every epoch's metrics); on CUDA every mode but fp32 runs the "
                        "tensor-core kernels (sm_80 or later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only when stderr is a terminal)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads of the NumPy path, at most the cores this process may use (a larger N is "
                        "capped, with a note) (default: $GPUCNN_NUM_THREADS, else the cores this "
                        "process may use, at most 8); results are the same bits for any N")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="with --device cuda: run every step eagerly (by default, after a few eager steps the "
                        "trainer captures one full-size step as a CUDA graph, checks it against an eager step "
                        "bit for bit, and replays it)")
    p.add_argument("--tensorboard", nargs="?", const=True, default=None, metavar="DIR",
                   help="write TensorBoard event files live (default DIR: RUN_DIR/tb): losses, accuracy, "
                        "learning rate, images/s, per-layer weight and gradient histograms and update ratios, "
                        "the first conv's filters, feature maps, the confusion matrix, time per stage, the "
                        "config. Needs tensorboardX (pip install \"gpucnn[tensorboard]\"); view with "
                        "tensorboard --logdir DIR")
    p.add_argument("--log-every", type=_nonneg_int, default=None, metavar="N",
                   help="steps between per-layer statistics (RUN_DIR/layers.jsonl: weight, gradient and "
                        "update norms) and per-step TensorBoard records (default: %d; 0: none)" % DEFAULT_LOG_EVERY)
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes of an MPI launch (mpiexec -n N gpucnn train "
                        "--distributed ...): --batch-size is the global batch, split over the ranks; rank 0 "
                        "prints and writes --out. Without mpiexec: one process")
    p.add_argument("--comm", choices=("auto", "mpi", "nccl"), default=None,
                   help="with --distributed: auto (default) = nccl between GPUs (--device cuda, several "
                        "ranks), else mpi; mpi stages GPU buffers through the host unless MPI is CUDA-aware")
    p.add_argument("--collective-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --distributed: how long a collective waits for every rank (default: 600); a rank "
                        "that has not arrived by then (stopped, hung) ends the job, named")
    p.set_defaults(func=_cmd_train)
    return p


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a checkpoint",
                       description="Evaluate a checkpoint on its dataset's test set (or training set).")
    p.add_argument("checkpoint", help="checkpoint.npz or a run directory")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.set_defaults(func=_cmd_evaluate)


def _add_predict(sub):
    from .inference import add_arguments, run

    p = sub.add_parser("predict", help="classify image files (drawings, scans, MNIST-style images)")
    add_arguments(p)
    p.set_defaults(func=lambda args, parser: run(args))


def _add_export(sub):
    from .export import cli as export_cli

    p = sub.add_parser("export", help="export a checkpoint to ONNX or safetensors")
    export_cli.add_arguments(p)
    p.set_defaults(func=lambda args, parser: export_cli.run(args))


def _add_plot(sub):
    p = sub.add_parser("plot", help="PNG plots of a run: curves, filters, feature maps, confusion matrix, "
                                    "gradient flow",
                       description="Write, in DIR: curves.png (loss and accuracy per epoch, from metrics.jsonl); "
                                   "filters.png (the first conv layer's filters), features.png (every conv "
                                   "stage's feature maps for a few test images) and confusion.png (the test "
                                   "set), from checkpoint.npz; gradflow.png (RMS gradient per layer and update "
                                   "ratios), from layers.jsonl. Works on runs without TensorBoard logs; what "
                                   "a run lacks is said in one line per missing plot.")
    p.add_argument("dir", help="run directory")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: DIR)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding the dataset files, for features.png and confusion.png (else as "
                        "gpucnn train looks for them)")
    p.set_defaults(func=_cmd_plot)


def _add_bench(sub, argv):
    """Register `bench`; gpucnn.bench is imported only when `bench` is the command."""
    wanted = next((a for a in argv if not a.startswith("-")), None) == "bench"
    if wanted:
        try:
            from . import bench
        except ModuleNotFoundError as exc:
            if exc.name not in ("gpucnn.bench",):
                raise
            bench = None
        if bench is not None:
            p = sub.add_parser("bench", help="benchmark layers and training steps",
                               description=(bench.__doc__ or "").strip().split("\n")[0] or None)
            bench.add_arguments(p)
            p.set_defaults(func=lambda args, parser: bench.run(args))
            return
    p = sub.add_parser("bench", help="benchmark layers and training steps (see gpucnn bench -h)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench_missing)


def _cmd_bench_missing(args, parser):
    parser.error("bench: gpucnn.bench is not available in this installation")


def build_parser(argv=()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpucnn", description="Convolutional networks from first principles, on NumPy or CuPy.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gpucnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_plot(sub)
    _add_bench(sub, list(argv))
    return parser


def _err(msg: str) -> None:
    print(f"gpucnn: error: {msg}", file=sys.stderr)


# -- commands -------------------------------------------------------------------


def _train_config(args, sp):
    """The resolved TrainConfig the arguments ask for (``sp.error`` on bad ones)."""
    from . import checkpoint as ck
    from .train import ResumeConflictError, TrainConfig, resume_config

    # every TrainConfig field has a flag whose default is None: None means "not given"
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if "dataset" not in given and args.resume is None and args.data_dir is not None:
        from .data.folder import is_image_folder

        if is_image_folder(args.data_dir):     # the layout says it: DIR/train/<class>/ or DIR/<class>/
            given["dataset"] = "folder"
    try:
        if args.resume is not None:
            config = resume_config(ck.load_checkpoint(args.resume).config, given, flags=True)
        else:
            config = TrainConfig(**given)
    except (FileNotFoundError, ck.CheckpointError, ResumeConflictError) as exc:
        sp.error(f"argument --resume: {exc}")
    except ValueError as exc:
        sp.error(f"argument --resume: {exc}" if args.resume is not None else str(exc))
    try:
        config = config.resolved()
    except ValueError as exc:
        sp.error(str(exc))
    if config.optimizer != "sgd" and args.momentum:
        sp.error(f"argument --momentum: applies to --optimizer sgd only (got {args.momentum})")
    return config


def _cmd_train(args, parser):
    """``gpucnn train``, one process or every rank of ``--distributed`` alike: rank 0 checks the
    arguments, prints and writes; an error every rank meets alike (bad arguments, an unusable
    checkpoint, a NaN/Inf loss) exits every rank with the usual status, printed once by rank 0.
    Running the ranks (the job's guard against one rank's failure, the collective timeout) is
    :func:`gpucnn.train.train`'s: the command only opens the communicator, to name the flag at fault."""
    import numpy as np

    from .data import DataError
    from .train import NonFiniteLossError, parallel, train

    sp = parser._gpucnn_sub["train"]
    if args.comm is not None and not args.distributed:
        sp.error("argument --comm: needs --distributed")
    if args.collective_timeout is not None and not args.distributed:
        sp.error("argument --collective-timeout: needs --distributed")
    options = _run_options(args)
    if args.tensorboard is not None:
        from .train.watch import TensorBoardMissing, require_tensorboard

        try:
            require_tensorboard()
        except TensorBoardMissing as exc:
            sp.error(f"argument --tensorboard: {exc}")
    comm = _communicator(sp, options, args) if args.distributed else None
    root = comm is None or comm.is_root
    if comm is not None:
        options = options.replace(distributed=comm)
        if options.collective_timeout is not None:   # from the first collective on: the config's broadcast
            comm.timeout = options.collective_timeout

    def usage(msg):  # exit 2 on every rank, printed by rank 0
        if root:
            flag = "--device" if args.device == "cuda" and "CUDA" in msg else None
            sp.error(f"argument {flag}: {msg}" if flag else msg)
        sys.exit(EXIT_USAGE)

    def failure(msg, code):
        if root:
            _err(msg)
        return code

    def root_config():  # the configuration, read by rank 0; a bad one exits every rank
        code, config = np.zeros(1, dtype=np.int64), None
        if root:
            try:
                config = _train_config(args, sp)
            except SystemExit as exc:
                code[0] = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if comm is not None:
            comm.broadcast(code)
        if code[0]:
            sys.exit(int(code[0]))
        return config

    config = root_config() if comm is None else parallel.guarded(comm, root_config)
    try:
        result = train(config, data_dir=args.data_dir, out_dir=args.out, resume=args.resume,
                       stop_after=args.stop_after, progress=not args.no_progress, overwrite=args.overwrite,
                       log=print if root else None, options=options)
    except NonFiniteLossError as exc:
        return failure(str(exc), EXIT_NONFINITE)
    except (DataError, FileNotFoundError) as exc:
        return failure(str(exc), EXIT_FAILURE)
    except ValueError as exc:  # configuration / checkpoint / device / run directory problems
        usage(str(exc))
    except OSError as exc:     # a run directory that cannot be written (RunDirWriteError says what was kept)
        return failure(str(exc) if type(exc).__name__ == "RunDirWriteError" else f"{type(exc).__name__}: {exc}",
                       EXIT_FAILURE)
    if root:
        print(result.summary(), flush=True)
    return 0


def _run_options(args):
    """How the run runs (:class:`~gpucnn.train.options.RunOptions`), from the flags, built once."""
    from .train.options import RunOptions

    return RunOptions(device=args.device, threads=args.threads, nvtx=args.nvtx, debug=args.debug,
                      cuda_graph=args.cuda_graph, distributed=(args.comm or "auto") if args.distributed else None,
                      collective_timeout=args.collective_timeout, precision=args.precision,
                      tensorboard=args.tensorboard,
                      **({} if args.log_every is None else {"log_every": args.log_every}))


def _communicator(sp, options, args):
    """The communicator of ``--distributed``, or a usage error naming the flag at fault."""
    from .backend import resolve_device
    from .train import parallel

    try:
        return parallel.communicator(options.distributed, resolve_device(options.device)[0])
    except (ValueError, ImportError) as exc:
        flag = "--device" if "CUDA" in str(exc) else ("--comm" if args.comm else "--distributed")
        sp.error(f"argument {flag}: {exc}")


def _device_or_error(p, device):
    from .backend import resolve_device

    try:
        return resolve_device(device)[0]
    except ValueError as exc:
        p.error(f"argument --device: {exc}")


def _load_model(p, path, device):
    from . import checkpoint as ck

    try:
        return ck.restore_model(path, device=device)
    except FileNotFoundError as exc:
        p.error(f"argument checkpoint: {exc}")
    except ck.CheckpointError as exc:
        p.error(f"argument checkpoint: {exc}")


def _cmd_evaluate(args, parser):
    import numpy as np

    from .data import DataError, load_arrays
    from .inference import inputs_for
    from .train import TrainConfig, confusion_matrix, evaluate
    from .train.datasource import dataset_for

    p = parser._gpucnn_sub["evaluate"]
    device = _device_or_error(p, args.device)
    model, ckpt = _load_model(p, args.checkpoint, device)
    dataset = ckpt.config.get("dataset", "mnist")
    try:
        cfg = TrainConfig.from_dict(ckpt.config) if ckpt.config else TrainConfig()
        if dataset == "folder" and args.data_dir is None:
            p.error(f"argument --data-dir: {ckpt.path} was trained on an image folder; name it with --data-dir")
        ds = dataset_for(cfg, args.data_dir, lambda m: print(m, file=sys.stderr))
    except (DataError, FileNotFoundError) as exc:
        _err(str(exc))
        return EXIT_FAILURE
    if ds.in_shape != tuple(model.in_shape) or len(ds.classes) != model.num_classes:
        _err(f"{args.data_dir or dataset}: images of {'x'.join(map(str, ds.in_shape))} in {len(ds.classes)} classes, "
             f"but {ckpt.path} takes {'x'.join(map(str, model.in_shape))} in {model.num_classes} classes")
        return EXIT_FAILURE
    if getattr(model, "classes", None) and list(model.classes) != list(ds.classes):
        _err(f"{args.data_dir or dataset}: classes {ds.classes} differ from the checkpoint's {list(model.classes)}")
        return EXIT_FAILURE
    if getattr(model, "mean", None) is not None and dataset == "folder":
        ds.mean, ds.std = tuple(model.mean), tuple(model.std)   # the statistics it was trained with
    x_tr, y_tr, x_te, y_te, classes = load_arrays(dataset, args.data_dir, device=device, data=ds)
    x, y = (x_te, y_te) if args.split == "test" else (x_tr, y_tr)
    x = inputs_for(model, x)    # the images follow the model's dtype (float64 checkpoints)
    k = len(classes)
    res = evaluate(model, x, y, models.make_loss(ckpt.model), args.batch_size, k, return_predictions=True)
    cm = confusion_matrix(y, res["predictions"], k)
    print(f"checkpoint: {ckpt.path} ({ckpt.model}, epoch {ckpt.epoch}, device {device})")
    print(f"{dataset} {args.split} set: {res['n']} images, loss {res['loss']:.4f}, "
          f"accuracy {100 * res['accuracy']:.2f}% ({int(np.trace(cm))}/{res['n']})")
    print()
    print("per-class accuracy:")
    names = [("" if c == str(i) else c) for i, c in enumerate(classes)]
    width = max(len(c) for c in names)
    for i, c in enumerate(names):
        n_i = int(cm[i].sum())
        acc = cm[i, i] / n_i if n_i else float("nan")
        label = f"{i:>2} {c:<{width}}" if width else f"{i:>2}"
        print(f"  {label}  {100 * acc:6.2f}%  ({int(cm[i, i])}/{n_i})")
    print()
    print("confusion matrix (rows: true class, columns: predicted class):")
    cw = max(5, len(str(int(cm.max()))) + 1)
    print("true\\pred" + "".join(f"{j:>{cw}}" for j in range(k)))
    for i in range(k):
        print(f"{i:>9}" + "".join(f"{int(v):>{cw}}" for v in cm[i]))
    return 0


def _cmd_plot(args, parser):
    from . import checkpoint as ck
    from .plots import NothingToPlot, missing_plots, plot_run

    p = parser._gpucnn_sub["plot"]
    notes = []
    try:
        written = plot_run(args.dir, args.out, args.data_dir, notes)
    except (FileNotFoundError, NotADirectoryError, NothingToPlot) as exc:
        p.error(f"argument dir: {exc}")
    except ck.CheckpointError as exc:
        p.error(f"argument dir: {exc}")
    except ValueError as exc:     # --out is a file
        p.error(f"argument --out: {exc}")
    for note in missing_plots(args.dir) + notes:
        print(f"gpucnn plot: note: {note}", file=sys.stderr)
    for w in written:
        print(f"wrote {w}")
    return 0


def _warning_printer(show):
    """A ``warnings.showwarning`` printing warnings about the user's files (a damaged
    ``metrics.jsonl``) as one ``gpucnn: warning:`` line, and any other warning with ``show``."""
    from .train.rundir import MetricsWarning

    def printer(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MetricsWarning):
            print(f"gpucnn: warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    return printer


def main(argv=None) -> int:
    """Entry point of the ``gpucnn`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    # remember the subparsers so commands can report errors as "gpucnn <cmd>: error: ..."
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parser._gpucnn_sub = sub_action.choices
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(warnings.showwarning)
            return int(args.func(args, parser) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during training (gpucnn.train.Terminated)
        from .train.stops import TrainingInterrupted, stopped_by

        signum = getattr(exc, "signum", signal.SIGINT)
        _err(exc.describe() if isinstance(exc, TrainingInterrupted) else stopped_by(signum))
        return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        if stdout_closed():
            return stdout_gone()
        _err(f"{type(exc).__name__}: {exc}")     # a pipe other than standard output: a real failure
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
