"""The ``pcfast`` console command.

    pcfast train       train PC, TP, DTP or BP on a dataset, logging loss, accuracy and energy per epoch
    pcfast transfer    learning-rate × width sweep per algorithm and parametrization (μTransfer)
    pcfast coordcheck  per-layer update size against width (the coordinate check)
    pcfast interp      PC's update between GD and Gauss–Newton in deep linear networks
    pcfast traces      each layer's energy against the inference step, across widths, under SP and μP
    pcfast plot        draw the figure of a results JSON again, without recomputing anything

Every subcommand shows progress bars on long work (``--no-progress`` turns them off), writes its
results under ``--out`` and lists every option with its default in ``--help``. The work itself lives
in :mod:`pcfast.experiments`; this module only parses arguments, checks them and reports.

A user's mistake never ends in a traceback: every option value is checked when it is parsed, and
every output path (``--out``, ``--json``, ``--save``) is created and test-written, the backend and
device checked, before any computation. Exit status (``EXIT_*``): 0 done; 1 the run finished
but failed (a training run diverged, an acceptance check of ``interp`` failed) or its data or files
could not be read or written; 2 a usage error (nothing was computed); 3 an unexpected internal
error (one line; ``PCFAST_DEBUG=1`` shows the traceback); 130 interrupted.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ALGOS = ("bp", "pc", "tp", "dtp", "ipc")
VARIANTS_HELP = ("bp, pc (PC with gamma_bar 0), pc:G (PC with gamma_bar G in [-1, 0], e.g. pc:-1), tp, dtp, "
                 "ipc (incremental PC)")
DEFAULT_OUT = Path("experiments/results")
BACKENDS = ("auto", "torch", "cpp", "triton", "reference")
SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; int64 everywhere they travel
LOG2_LR_RANGE = (-126, 127)  # 2^LO … 2^HI stays a normal float32 number

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A mistake in the command line found before any computation: reported in one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``pcfast COMMAND: error: … (see … --help)``."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help (unless the help already says it), descriptions kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action.default, bool) and action.default is False:
            return text
        return super()._get_help_string(action)


DEVICE_HELP = "where to train: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (default: auto)"

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _int_at_least(low: int, message: str):
    """An argparse type: an integer >= ``low``; ``message`` (with ``{}`` for the value) otherwise."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(message.format(value))
        return value
    return parse


_widths = _int_at_least(1, "widths must be positive, got {}")
_positive_int = _int_at_least(1, "expected a positive integer, got {}")
_count = _int_at_least(0, "expected an integer >= 0, got {}")


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2^63 - 1 = {SEED_MAX}], got {value}")
    return value


def _log2_lr(text: str) -> int:
    value = _int(text)
    lo, hi = LOG2_LR_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"expected an exponent in [{lo}, {hi}] (learning rates 2^{lo} ... 2^{hi}, the float32 range), got {value}")
    return value


def _real(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval, with a message that states the interval."""
    left, right = "(" if low_open or low is None else "[", ")" if high_open or high is None else "]"
    interval = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) \
            and (high is None or (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


_positive = _real(0.0, low_open=True)
_non_negative = _real(0.0)
_momentum = _real(0.0, 1.0, high_open=True)
_fraction = _real(0.0, 1.0, high_open=True)
_gamma_bar = _real(-1.0, 0.0)
_precision = _real(0.0, 1e6, low_open=True)  # beyond, the relaxation's step κ ~ 1/γ underflows


def _variant(text: str) -> str:
    from ..experiments.common import parse_variant

    try:
        return parse_variant(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p, *, out: bool = True) -> None:
    if out:
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="directory for the result files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------ checks before any work


def _distinct(values, option: str, *, at_least: int = 1) -> None:
    """``values`` (an option's list; ``None`` when not given) holds no repeats and at least
    ``at_least`` entries."""
    if values is None:
        return
    seen = set()
    for v in values:
        if v in seen:
            raise UsageError(f"{option}: {v} is given twice; give each value once")
        seen.add(v)
    if len(seen) < at_least:
        raise UsageError(f"{option}: need at least {at_least} distinct values, got {len(seen)} ({' '.join(map(str, values))})")


def _all_distinct(*options: tuple[str, list | None]) -> None:
    """``_distinct`` for each ``(option, values)``."""
    for option, values in options:
        _distinct(values, option)


def _run_and_write(run, write, describe, settings, args) -> dict:
    """Run an experiment on ``settings``, write its files under ``--out``, print its table and what
    was written; the result."""
    result = run(settings, show_progress=not args.no_progress)
    paths = write(result, args.out)
    print(describe(result))
    print(f"done in {result['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return result


def prepare_output_dir(directory: Path, files: list[str] = (), option: str = "--out") -> None:
    """Create ``directory`` (with its parents) and prove it writable by creating and removing a
    temporary file in it; check that none of ``files`` (the result files to be written there) is a
    directory or a read-only file. ``UsageError`` naming ``option`` otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{option}: {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UsageError(f"{option}: cannot write in {directory} ({exc.strerror or exc})") from None
    for name in files:
        target = directory / name
        if target.is_dir():
            raise UsageError(f"{option}: {target} is a directory, but a result file of that name is to be written")
        if target.exists() and not os.access(target, os.W_OK):
            raise UsageError(f"{option}: {target} exists and is not writable")


def prepare_output_file(path: Path, option: str) -> None:
    """The file ``path`` can be written: its directory is created and test-written (see
    ``prepare_output_dir``), and the path itself is not a directory or a read-only file."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(("/", os.sep)):
        raise UsageError(f"{option}: {path} is a directory; give a file name")
    prepare_output_dir(path.parent, [path.name], option)


def check_backend(backend: str | None, device: str | None) -> None:
    """``backend`` can run on ``device`` here: ``--backend triton`` needs a CUDA device (or
    ``TRITON_INTERPRET=1``) and triton, ``--backend cpp`` the built C++ engine."""
    if backend in (None, "auto"):
        return
    from ..ops import is_available

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton":
        import torch

        if not (torch.cuda.is_available() or interpreted):
            raise UsageError("--backend triton: needs a CUDA GPU, and torch sees none here; use --backend auto "
                             "(the C++ engine or torch on the CPU), or set TRITON_INTERPRET=1 to run the kernels "
                             "slowly under the triton interpreter")
        if not interpreted and device is not None and device.startswith("cpu"):
            raise UsageError("--backend triton: the kernels run on CUDA tensors, not with --device cpu; use "
                             "--device cuda, or --backend auto on the CPU")
    if not is_available(backend):
        hint = {"triton": "install triton (pip install 'pcfast[triton]')",
                "cpp": "reinstall pcfast with a C++ compiler (pip install --no-build-isolation .) to build "
                       "pcfast._C, or use --backend torch"}.get(backend, "use --backend auto")
        raise UsageError(f"--backend {backend}: not available here; {hint}")


def check_device(device: str | None) -> None:
    if device is None:
        return
    from ..experiments.common import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def check_plotting() -> None:
    """Figures need matplotlib: say so before the work, not after it."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("figures need matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'pcfast[plot]')")


# ---------------------------------------------------------------------------------------------- train


TRAIN_SETTINGS = ("algo", "dataset", "root", "preset", "base_width", "gamma_bar", "width", "depth", "activation",
                  "epochs", "batch_size", "lr", "momentum", "loss", "inference_steps", "inference_lr", "inference_tol",
                  "beta", "feedback_lr", "backend", "seed", "train_size", "optimizer", "model", "fpa")
MODEL_HELP = ("network: mlp (--depth hidden layers of --width units, on the flattened images) or cnn (--depth "
              "3x3 conv layers of --width channels, each with the activation and 2x2 max pooling, then a linear "
              "readout, on the images (N, C, H, W); needs a dataset with a known image shape; PC trains it "
              "with --fpa: without FPA its relaxation diverges as the conv weights grow)")
OPTIMIZER_HELP = ("update rule: torch.optim.SGD (with --momentum), Adam or AdamW (torch's betas, eps and weight "
                  "decay); the muP learning-rate multipliers follow the rule")


def _train_parser(sub) -> None:
    from ..experiments.common import OPTIMIZERS

    from ..experiments.train import MODEL_DEFAULTS, MODELS

    mlp, cnn = MODEL_DEFAULTS["mlp"], MODEL_DEFAULTS["cnn"]

    def per_model(key: str) -> str:
        return f"(default: {mlp[key]:{'' if isinstance(mlp[key], str) else 'g'}} with --model mlp, " \
               f"{cnn[key]:{'' if isinstance(cnn[key], str) else 'g'}} with --model cnn)"

    p = sub.add_parser("train", help="train one or more algorithms on a dataset and report accuracy",
                       description="Train an MLP (or with --model cnn a conv net, on the images) with PC, TP, DTP "
                                   "or BP under SP or muP in a plain loop (cosine "
                                   "learning-rate schedule); log loss, accuracy and energy per epoch, and a warning "
                                   "naming the setting most likely at fault when a run collapses (accuracy at "
                                   "chance, loss or reconstruction loss exploding). --save PATH writes a checkpoint "
                                   "after every epoch (model and optimizer state_dict, scheduler, settings, log); "
                                   "--resume PATH continues that run where it stopped, with the same result as an "
                                   "uninterrupted run.")
    p.add_argument("--algo", nargs="+", choices=ALGOS, default=["pc", "bp"], help="algorithms to train")
    p.add_argument("--dataset", default="mnist5k", help="mnist5k (embedded), digits (embedded), mnist, fashion_mnist, cifar10")
    p.add_argument("--root", default=None, help="directory holding dataset files (mnist, fashion_mnist, cifar10)")
    p.add_argument("--model", choices=MODELS, default="mlp", help=MODEL_HELP)
    p.add_argument("--preset", choices=("sp", "mup"), default="mup", help="parametrization")
    p.add_argument("--base-width", type=_positive_int, default=None,
                   help=f"width at which muP equals SP {per_model('base_width')}")
    p.add_argument("--gamma-bar", type=_gamma_bar, default=0.0, help="PC output-precision exponent in [-1, 0]")
    p.add_argument("--width", type=_widths, default=None,
                   help=f"hidden width: units per hidden layer of an MLP, channels per conv layer of a CNN "
                        f"{per_model('width')}")
    p.add_argument("--depth", type=_positive_int, default=2,
                   help="number of hidden layers (of a CNN: conv layers)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu", "sigmoid", "gelu"), help="hidden activation")
    p.add_argument("--epochs", type=_positive_int, default=8, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="minibatch size")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"{OPTIMIZER_HELP} {per_model('optimizer')}")
    p.add_argument("--lr", type=_positive, default=None,
                   help="base learning rate (default: 0.03 with --optimizer sgd; with adam or adamw 0.001 for "
                        "--model mlp, 0.003 for --model cnn)")
    p.add_argument("--momentum", type=_momentum, default=None,
                   help="SGD momentum in [0, 1) (default: 0.9; not with --optimizer adam or adamw)")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse", help="output loss")
    p.add_argument("--inference-steps", type=_count, default=20,
                   help="PC relaxation steps T (the cap, with --inference-tol)")
    p.add_argument("--inference-lr", type=_positive, default=None,
                   help=f"PC inference rate kappa {per_model('inference_lr')}")
    p.add_argument("--fpa", action="store_true",
                   help="PC under the fixed-prediction assumption: predictions, activation derivatives and the "
                        "pooling's routing stay at their feedforward values during the relaxation")
    p.add_argument("--inference-tol", type=_fraction, default=None, metavar="TOL",
                   help="PC adaptive stopping: end a relaxation after the first step whose size is at most TOL times "
                        "the largest step so far (0 <= TOL < 1); the mean steps taken are logged per epoch")
    p.add_argument("--trace", type=Path, default=None, metavar="PATH",
                   help="write PC's per-step traces (energy per layer after every inference step, activity-gradient "
                        "norms) to this JSON file; costs one host read per step")
    p.add_argument("--beta", type=_non_negative, default=0.5, help="TP/DTP output target step")
    p.add_argument("--feedback-lr", type=_positive, default=None,
                   help=f"TP/DTP feedback learning rate {per_model('feedback_lr')}")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="compute backend")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=_seed, default=0, help="init and batch-order seed, in [0, 2^63 - 1]")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="train on the first N training images (default: all)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the per-epoch log to this JSON file")
    p.add_argument("--result", type=Path, default=None, metavar="PATH",
                   help="write the run as a results file (this command, the settings, the machine, the final and "
                        "per-epoch test accuracies) to this JSON file, and its figure (test accuracy per epoch) "
                        "next to it as PATH with .png; 'pcfast plot PATH' redraws it")
    p.add_argument("--save", type=Path, default=None, metavar="PATH",
                   help="write a checkpoint to this file after every epoch (torch.save; resume with --resume)")
    p.add_argument("--resume", type=Path, default=None, metavar="PATH",
                   help="continue the run saved in this checkpoint (its settings are used; the checkpoint keeps "
                        "being updated there unless --save names another file)")
    _add_common(p, out=False)
    p.set_defaults(func=_train, parser=p)


def _write_train_result(args, config, log) -> None:
    """``--result``: the run's results JSON and its figure."""
    from ..experiments.common import write_json
    from ..experiments.train import plot_train, train_result

    result = train_result(" ".join(["pcfast", *map(str, args.argv)]), config.settings(), log)
    write_json(args.result, result)
    print(f"result: {args.result}, {plot_train(result, args.result.with_suffix('.png'))}")


def _silent(*_args, **_kwargs) -> None:
    """``say`` for the processes of a torchrun job other than the first."""


def _check_update_rule(args, optimizer: str | None = None) -> None:
    """SGD's --momentum goes with --optimizer sgd only (``optimizer``: the rule in force, when
    --optimizer was left to a default)."""
    rule = optimizer or args.optimizer
    if rule != "sgd" and args.momentum is not None:
        raise UsageError(f"--momentum: SGD's momentum, but --optimizer {rule} has none (it has betas); "
                         "drop --momentum" + ("" if args.optimizer else " or give --optimizer sgd"))


def _train(args) -> int:
    from ..experiments import run_train
    from ..experiments.train import TrainConfig, join_torchrun, leave_torchrun, load_checkpoint

    from ..experiments.train import MODEL_DEFAULTS

    _distinct(args.algo, "--algo")
    _check_update_rule(args, args.optimizer or MODEL_DEFAULTS[args.model]["optimizer"])
    resume = None
    if args.resume is not None:
        given = [f"--{dest.replace('_', '-')}" for dest in TRAIN_SETTINGS
                 if getattr(args, dest) != args.parser.get_default(dest)]
        if given:
            raise UsageError(f"--resume takes every training setting from the checkpoint; drop {' '.join(given)}")
        try:
            resume = load_checkpoint(args.resume)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    save = args.save if args.save is not None else args.resume  # a resumed run keeps its checkpoint current
    if args.json is not None and save is not None and args.json.resolve() == save.resolve():
        raise UsageError(f"--json: {args.json} is also the checkpoint file; give the log another name")
    check_device(args.device)
    check_backend(resume["settings"].get("backend", "auto") if resume else args.backend, args.device)
    # Under torchrun every process trains its share of each batch; the first one alone speaks and writes.
    try:
        ranks = join_torchrun(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    leader = ranks is None or ranks[0] == 0
    if not leader:
        args.json, save, args.trace, args.result = None, None, None, None
    if args.result is not None:
        check_plotting()
    for option, path in (("--json", args.json), ("--save" if args.save is not None else "--resume", save),
                         ("--trace", args.trace), ("--result", args.result),
                         ("--result", None if args.result is None else args.result.with_suffix(".png"))):
        if path is not None:
            prepare_output_file(path, option)
    try:
        config = TrainConfig(tuple(args.algo), **{dest: getattr(args, dest) for dest in TRAIN_SETTINGS[1:]})
        log = run_train(config=config, device=args.device, show_progress=leader and not args.no_progress, save=save,
                        resume=resume, trace=args.trace, say=print if leader else _silent)
    finally:
        if ranks is not None:
            leave_torchrun()
    if args.json:
        from ..experiments.common import _clean

        args.json.write_text(json.dumps(_clean(log), indent=1))  # a non-finite value is written as null
    if args.result is not None:
        _write_train_result(args, TrainConfig(**resume["settings"]) if resume else config, log)
    if save is not None:
        print(f"checkpoint: {save}")
    return EXIT_FAILED if any(e.get("diverged") for e in log) else EXIT_OK


# ------------------------------------------------------------------------------------------- transfer


def _transfer_parser(sub) -> None:
    from ..experiments.transfer import PRESETS

    quick, medium, full = PRESETS["quick"], PRESETS["medium"], PRESETS["full"]
    p = sub.add_parser(
        "transfer", help="learning-rate x width sweep per algorithm and parametrization (muTransfer)",
        description=(
            "Train every algorithm x parametrization x width x learning rate (factor-2 grid) for a few epochs, "
            "once per seed (a seed fixes the init and the batch order); record the final train loss and test "
            "accuracy, averaged over seeds, with a cosine learning-rate decay; write "
            "transfer_<preset>.csv/.json/.png under --out and print the optimal learning rate per width and its "
            "drift in grid steps.\n\npresets:\n"
            f"  --quick   widths {list(quick.widths)}, {quick.train_size} train images, {quick.epochs} epochs, "
            f"PC T={quick.inference_steps}: <= 5 minutes on 2 idle CPU cores\n"
            f"  --medium  widths {list(medium.widths)}, {medium.train_size} train images, {medium.epochs} epochs, "
            f"PC T={medium.inference_steps}: about 25 minutes on 2 idle CPU cores\n"
            f"  --full    the paper's setting: widths {list(full.widths)}, {full.dataset} (falls back to the embedded "
            f"mnist5k when its files are missing, and says so), all train images, {full.epochs} epochs, "
            f"PC T={full.inference_steps}: days on 2 CPU cores, meant for a GPU\n"
            "Options given explicitly override the preset. Runs that diverge are kept and drawn as x at the cap."))
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="preset", action="store_const", const="quick", default=argparse.SUPPRESS,
                       help="the quick preset (the default)")
    which.add_argument("--medium", dest="preset", action="store_const", const="medium", default=argparse.SUPPRESS,
                       help="the medium preset")
    which.add_argument("--full", dest="preset", action="store_const", const="full", default=argparse.SUPPRESS,
                       help="the paper-scale preset")
    _add_sweep_options(p, quick)
    _add_execution_options(p)
    _add_common(p)
    p.set_defaults(func=_transfer)


def _add_sweep_options(p, quick) -> None:
    """What a sweep trains: every option defaults to the preset's value (``None``: not given)."""
    from ..experiments.common import OPTIMIZERS
    from ..experiments.transfer import ADAM_GRID

    p.add_argument("--model", choices=("mlp", "cnn"), default=None,
                   help="network swept: mlp (the presets above) or cnn, a conv net whose width is its channels, "
                        "trained on images, with the conv-net presets of pcfast.experiments.transfer.CNN_PRESETS "
                        "(result files transfer_<preset>_cnn.*) (default: mlp)")
    p.add_argument("--algo", nargs="+", type=_variant, default=None, metavar="ALGO",
                   help=f"algorithm variants: {VARIANTS_HELP} (default: the preset's; bp pc pc:-1 tp dtp for mlp)")
    p.add_argument("--parametrization", nargs="+", choices=("sp", "mup"), default=None,
                   help="parametrizations (default: sp mup)")
    p.add_argument("--widths", nargs="+", type=_widths, default=None, help="hidden widths (default: the preset's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help=f"{OPTIMIZER_HELP}; adam and adamw sweep 2^{ADAM_GRID[0]} ... 2^{ADAM_GRID[1]} for every "
                        "algorithm unless --log2-lr is given")
    p.add_argument("--log2-lr", nargs=2, type=_log2_lr, default=None, metavar=("LO", "HI"),
                   help=f"learning-rate grid 2^LO ... 2^HI for every algorithm, LO and HI in {list(LOG2_LR_RANGE)} "
                        "(default: per algorithm, see pcfast.experiments.transfer.DEFAULT_GRIDS)")
    p.add_argument("--dataset", default=None, help="mnist5k, digits, mnist, fashion_mnist, cifar10 (default: the preset's)")
    p.add_argument("--root", default=None, help="directory holding dataset files")
    p.add_argument("--train-size", type=_positive_int, default=None, help="train on the first N training images (default: the preset's)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"minibatch size (default: {quick.batch_size})")
    p.add_argument("--momentum", type=_momentum, default=None, help=f"SGD momentum in [0, 1) (default: {quick.momentum})")
    p.add_argument("--base-width", type=_positive_int, default=None, help=f"width where muP equals SP (default: {quick.base_width})")
    p.add_argument("--readout-scale", type=_positive, default=None,
                   help="factor on the readout init for every algorithm (default: per algorithm, "
                        + ", ".join(f"{k} {v:g}" for k, v in quick.readout_scales.items()) + ")")
    p.add_argument("--inference-steps", type=_count, default=None, help="PC relaxation steps T (default: the preset's)")
    p.add_argument("--inference-lr", type=_positive, default=None, help=f"PC inference rate kappa (default: {quick.inference_lr})")
    p.add_argument("--beta", type=_non_negative, default=None, help=f"TP/DTP output target step (default: {quick.beta})")
    p.add_argument("--feedback-lr", type=_positive, default=None, help=f"TP/DTP feedback learning rate (default: {quick.feedback_lr})")
    p.add_argument("--seeds", nargs="+", type=_seed, default=None,
                   help=f"init and batch-order seeds; losses are averaged over them (default: {' '.join(map(str, quick.seeds))})")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="compute backend (default: auto: triton on a GPU, cpp on CPU when built, else torch)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--name", default=None, help="file stem transfer_<NAME>: letters, digits, '-', '_', '.' "
                                                "(default: the preset's name)")


def _add_execution_options(p) -> None:
    run = p.add_argument_group("execution", "Every finished training is appended to the journal "
                               "transfer_<NAME>.journal.jsonl under --out; the result files are built from it.")
    run.add_argument("--executor", choices=("serial", "ray"), default="serial",
                     help="serial: one training after another in this process; ray: each training a Ray task "
                          "(pip install 'pcfast[distributed]'), results collected as they finish")
    run.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="Ray cluster to submit to (e.g. auto, or HEAD:6379); default: start a local Ray "
                          "instance with as many CPUs as there are free cores")
    run.add_argument("--cpus-per-trial", type=_positive_int, default=1, metavar="N",
                     help="CPU threads of each training (its Ray resource too); part of the settings, since "
                          "the thread count changes float rounding")
    run.add_argument("--gpus-per-trial", type=_non_negative, default=0.0, metavar="X",
                     help="GPUs of each Ray task, fractional allowed (0.25: four trainings share a GPU)")
    run.add_argument("--resume", action="store_true",
                     help="continue the sweep whose journal is under --out: journaled trainings are not run "
                          "again; the options must be those that started it")


def _transfer(args) -> int:
    from ..experiments.transfer import format_summary, journal_path, write_transfer

    preset = getattr(args, "preset", "quick")
    settings = _transfer_settings(args, preset)
    stem = f"transfer_{settings.name}"
    check_plotting()
    prepare_output_dir(args.out, [f"{stem}.json", f"{stem}.csv", f"{stem}.png", f"{stem}.journal.jsonl"])
    journal = journal_path(args.out, settings.name)
    if args.dataset is not None:
        settings.fallback_dataset = None  # a dataset asked for by name is used, or reported missing
    if args.log2_lr:
        lo, hi = sorted(args.log2_lr)
        settings.grids = {v: (lo, hi) for v in settings.variants}
    if args.readout_scale is not None:
        settings.readout_scales = {v: args.readout_scale for v in settings.variants}
    check_journal(journal, args.resume)
    result = _run_sweep(args, settings, preset, journal)
    paths = write_transfer(result, args.out)
    print(format_summary(result))
    run = result["run"]
    resumed = f", {run['trials_resumed']} taken from the journal" if run["trials_resumed"] else ""
    print(f"{result['runs_trained']} runs ({len(result['rows'])} configurations): {run['trials_run']} trained in "
          f"{run['seconds']:.0f} s{resumed}; wrote " + ", ".join(str(p) for p in paths) + f" (journal: {journal})")
    return EXIT_OK


def _transfer_settings(args, preset: str):
    """The sweep's settings from the preset and the options given, every option checked."""
    from ..experiments.transfer import settings_for

    overrides = {
        "dataset": args.dataset, "root": args.root, "widths": tuple(args.widths) if args.widths else None,
        "variants": tuple(args.algo) if args.algo else None,
        "parametrizations": tuple(args.parametrization) if args.parametrization else None,
        "train_size": args.train_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "momentum": args.momentum, "base_width": args.base_width, "inference_steps": args.inference_steps,
        "inference_lr": args.inference_lr, "beta": args.beta, "feedback_lr": args.feedback_lr,
        "seeds": tuple(args.seeds) if args.seeds else None, "backend": args.backend, "name": args.name,
        "device": args.device, "optimizer": args.optimizer,
    }
    _all_distinct(("--widths", args.widths), ("--seeds", args.seeds), ("--algo", args.algo),
                  ("--parametrization", args.parametrization))
    if args.name is not None and not _is_file_stem(args.name):
        raise UsageError(f"--name: expected a plain file stem (letters, digits, '-', '_', '.'), got {args.name!r}")
    _check_update_rule(args)
    on_ray = args.executor == "ray"
    check_execution(args)
    if not on_ray:
        check_device(args.device)
    settings = settings_for(preset, check_device=not on_ray, threads=args.cpus_per_trial, model=args.model,
                            **overrides)
    if not on_ray:
        check_backend(settings.backend, args.device)
    return settings


def _run_sweep(args, settings, preset: str, journal: Path) -> dict:
    """Run the sweep on the executor the options ask for; on any failure say what the journal holds."""
    from ..experiments.transfer import journal_settings, run_transfer

    executor = make_executor(args)
    try:
        if args.resume:  # the settings are checked against the journal before any training
            from ..experiments.sweep import Journal

            try:
                Journal(journal, journal_settings(settings, executor.device_for(settings.device))).read()
            except ValueError as exc:
                raise UsageError(f"--resume: {exc}") from None
        rule = "" if settings.optimizer == "sgd" else f", {settings.optimizer}"
        print(f"pcfast transfer ({preset}{rule}): {len(settings.variants)} algorithms x "
              f"{len(settings.parametrizations)} parametrizations x widths {list(settings.widths)}; "
              f"{executor.describe()}, {settings.threads} thread{'s' if settings.threads != 1 else ''} per "
              f"training; results in {args.out}/")
        try:
            return run_transfer(settings, executor=executor, journal=journal, resume=args.resume,
                                show_progress=not args.no_progress)
        except BaseException:  # Ctrl-C, a lost cluster, a failed trial: what finished is journaled
            if journal.exists():
                done = sum(1 for line in journal.open() if line.endswith("\n"))
                print(f"pcfast transfer: {done} finished trainings are in {journal}; the same command with "
                      "--resume continues the sweep", file=sys.stderr)
            raise
    finally:
        executor.close()


def check_execution(args) -> None:
    """The execution options fit together, and Ray is installed when asked for."""
    if args.executor != "ray":
        for option, given in (("--ray-address", args.ray_address is not None),
                              ("--gpus-per-trial", args.gpus_per_trial != 0)):
            if given:
                raise UsageError(f"{option}: only with --executor ray (the serial executor uses this process; "
                                 "--device picks its device)")
        return
    from ..experiments.sweep import ray_available

    if not ray_available():
        raise UsageError("--executor ray: ray is not installed: pip install 'pcfast[distributed]' (or pip install ray)")
    device = args.device or "auto"
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and args.gpus_per_trial == 0:
        raise UsageError(f"--device {device}: Ray tasks get no GPU with --gpus-per-trial 0; give "
                         "--gpus-per-trial (e.g. 0.25)")
    if device == "cpu" and args.gpus_per_trial > 0:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: the trainings run on --device cpu; "
                         "drop --gpus-per-trial or use --device auto")


def check_journal(journal: Path, resume: bool) -> None:
    """``--resume`` needs a journal; a fresh sweep must not silently discard one."""
    from ..experiments.sweep import Journal

    found = Journal(journal, {}).exists()
    if resume and not found:
        raise UsageError(f"--resume: there is no journal {journal} to resume (run without --resume to start the sweep)")
    if not resume and found:
        lines = sum(1 for _ in journal.open())
        raise UsageError(f"--out: {journal} holds {lines} finished trainings of an earlier sweep; add --resume to "
                         "continue it (or to rebuild its files), or delete it to start over")


def make_executor(args):
    """The executor the options ask for; connecting to Ray is checked here, before any training."""
    from ..experiments.sweep import RayExecutor, SerialExecutor

    if args.executor == "serial":
        return SerialExecutor()
    try:
        return RayExecutor(address=args.ray_address, cpus_per_trial=args.cpus_per_trial,
                           gpus_per_trial=args.gpus_per_trial)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None
    except Exception as exc:  # ray's connection errors (ConnectionError, RuntimeError, …)
        where = f"the Ray cluster at {args.ray_address}" if args.ray_address else "a local Ray instance"
        raise UsageError(f"--executor ray: cannot start or reach {where} ({_one_line(exc)[:200]})") from None


def _is_file_stem(name: str) -> bool:
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "-_." for c in name)


# --------------------------------------------------------------------------------------------- traces


def _traces_parser(sub) -> None:
    from ..experiments.traces import TraceSettings

    d = TraceSettings()
    p = sub.add_parser(
        "traces", help="each layer's energy against the inference step, across widths, under SP and muP",
        description=("Train a PC model per parametrization and width (tanh 784-M-M-10 on the embedded MNIST subset, "
                     "the README's setting), relax it on held-out images with the trace on, and write traces.json "
                     "and traces.png under --out: each layer's energy per sample after every inference step and "
                     "the step size relative to the largest so far (what --inference-tol tests)."))
    p.add_argument("--parametrization", nargs="+", choices=("sp", "mup"), default=list(d.parametrizations),
                   help="parametrizations")
    p.add_argument("--widths", nargs="+", type=_widths, default=list(d.widths), help="hidden widths")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="training epochs before the relaxation")
    p.add_argument("--train-size", type=_positive_int, default=d.train_size, help="training images")
    p.add_argument("--lr", type=_positive, default=d.lr, help="base learning rate")
    p.add_argument("--inference-steps", type=_positive_int, default=d.inference_steps,
                   help="PC relaxation steps T in training (marked in the figure)")
    p.add_argument("--inference-lr", type=_positive, default=d.inference_lr, help="PC inference rate kappa")
    p.add_argument("--relax-steps", type=_positive_int, default=d.relax_steps,
                   help="inference steps of the traced relaxation")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="compute backend")
    _add_common(p)
    p.set_defaults(func=_traces)


def _traces(args) -> int:
    from ..experiments.traces import TraceSettings, format_traces, run_traces, write_traces

    _all_distinct(("--widths", args.widths), ("--parametrization", args.parametrization))
    if args.relax_steps < args.inference_steps:
        raise UsageError(f"--relax-steps: expected at least --inference-steps ({args.inference_steps}), the T the "
                         f"figure marks; got {args.relax_steps}")
    check_backend(args.backend, None)
    check_plotting()
    prepare_output_dir(args.out, ["traces.json", "traces.png"])
    settings = TraceSettings(
        parametrizations=tuple(args.parametrization), widths=tuple(args.widths), epochs=args.epochs,
        train_size=args.train_size, lr=args.lr, inference_steps=args.inference_steps,
        inference_lr=args.inference_lr, relax_steps=args.relax_steps, backend=args.backend)
    _run_and_write(run_traces, write_traces, format_traces, settings, args)
    return EXIT_OK


# ----------------------------------------------------------------------------------------- coordcheck


def _coordcheck_parser(sub) -> None:
    from ..experiments.coordcheck import CoordSettings

    d = CoordSettings()
    p = sub.add_parser(
        "coordcheck", help="per-layer update size against width, per algorithm and parametrization",
        description=("Measure each layer's pre-activation change Delta u_l and activation size over the first steps "
                     "across widths (pcfast.coord_check, the core test's settings); write coordcheck.json and "
                     "coordcheck.png under --out and print the width slopes. Under muP every slope should be ~0."))
    p.add_argument("--algo", nargs="+", type=_variant, default=list(d.variants), metavar="ALGO", help=VARIANTS_HELP)
    p.add_argument("--model", choices=("mlp", "cnn"), default=None,
                   help="network measured: mlp (tanh 784-M-M-10) or cnn, a conv net whose width M is the channels "
                        "of its conv layers, on images (default: mlp)")
    p.add_argument("--parametrization", nargs="+", choices=("sp", "mup"), default=list(d.parametrizations),
                   help="parametrizations")
    p.add_argument("--widths", nargs="+", type=_widths, default=list(d.widths), help="hidden widths (at least two)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps measured")
    p.add_argument("--seeds", nargs="+", type=_seed, default=list(d.seeds), help="init seeds; sizes are averaged")
    p.add_argument("--lr", type=_positive, default=d.lr, help="base learning rate")
    p.add_argument("--base-width", type=_positive_int, default=d.base_width, help="width at which muP equals SP")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="fixed batch of pixel-like inputs")
    p.add_argument("--readout-scale", type=_positive, default=d.readout_scale, help="factor on the readout init")
    p.add_argument("--inference-steps", type=_count, default=d.inference_steps, help="PC relaxation steps T")
    p.add_argument("--inference-lr", type=_positive, default=d.inference_lr, help="PC inference rate kappa")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="compute backend")
    _add_common(p)
    p.set_defaults(func=_coordcheck)


def _coordcheck(args) -> int:
    from ..experiments.coordcheck import CoordSettings, format_coordcheck, run_coordcheck, write_coordcheck

    _distinct(args.widths, "--widths", at_least=2)  # a slope against width needs two widths
    _all_distinct(("--seeds", args.seeds), ("--algo", args.algo), ("--parametrization", args.parametrization))
    check_backend(args.backend, None)
    check_plotting()
    prepare_output_dir(args.out, ["coordcheck.json", "coordcheck.png"])
    settings = CoordSettings(
        variants=tuple(args.algo), parametrizations=tuple(args.parametrization), widths=tuple(args.widths),
        steps=args.steps, seeds=tuple(args.seeds), base_width=args.base_width, lr=args.lr,
        batch_size=args.batch_size, readout_scale=args.readout_scale, inference_steps=args.inference_steps,
        inference_lr=args.inference_lr, backend=args.backend)
    run = run_coordcheck if args.model is None else functools.partial(run_coordcheck, model=args.model)
    _run_and_write(run, write_coordcheck, format_coordcheck, settings, args)
    return 0


# --------------------------------------------------------------------------------------------- interp


def _interp_parser(sub) -> None:
    from ..experiments.interp import InterpSettings

    d = InterpSettings()
    p = sub.add_parser(
        "interp", help="cosine of PC's update with GD and Gauss-Newton in deep linear networks",
        description=("Deep linear networks under muP with output precision gamma_L = gamma * m^(-gamma_bar): relax "
                     "PC (float64, backend torch) and compare its weight update with the GD gradient and the "
                     "Gauss-Newton-target direction by cosine, against width, gamma_bar, inference steps and "
                     "gamma; each relaxed update is checked against the closed-form equilibrium. Writes interp.json "
                     "and interp.png under --out."))
    p.add_argument("--widths", nargs="+", type=_widths, default=list(d.widths), help="hidden widths")
    p.add_argument("--gamma-bars", nargs="+", type=_gamma_bar, default=list(d.gamma_bars), help="values of gamma_bar in [-1, 0]")
    p.add_argument("--gamma", type=_precision, default=d.gamma, help="output precision at the base width, in (0, 1e6]")
    p.add_argument("--gamma-sweep", nargs="+", type=_precision, default=list(d.gamma_sweep),
                   help="values of gamma for the interpolation panel, at the smallest width")
    p.add_argument("--base-width", type=_positive_int, default=d.base_width, help="width at which muP equals SP")
    p.add_argument("--depth", type=_positive_int, default=d.hidden_layers, help="number of hidden layers")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="images from mnist5k")
    p.add_argument("--inference-steps", type=_positive_int, default=d.inference_steps, help="PC relaxation steps T")
    p.add_argument("--kappa-scale", type=_real(0.0, 2.0, low_open=True, high_open=True), default=d.kappa_scale,
                   help="inference rate kappa = SCALE / (1 + max_l gamma_(l+1) ||W_(l+1)||^2)")
    p.add_argument("--steps-curve", nargs="+", type=_count, default=list(d.steps_curve), help="T values of the steps panel")
    p.add_argument("--steps-curve-width", type=_widths, default=d.steps_curve_width, help="width of the steps panel")
    p.add_argument("--seeds", nargs="+", type=_seed, default=list(d.seeds), help="init seeds; cosines are averaged")
    _add_common(p)
    p.set_defaults(func=_interp)


def _interp(args) -> int:
    from ..experiments.interp import InterpSettings, format_interp, run_interp, write_interp

    _all_distinct(("--widths", args.widths), ("--gamma-bars", args.gamma_bars), ("--seeds", args.seeds),
                  ("--gamma-sweep", args.gamma_sweep), ("--steps-curve", args.steps_curve))
    check_plotting()
    prepare_output_dir(args.out, ["interp.json", "interp.png"])
    widths = tuple(sorted(args.widths))
    curve_width = args.steps_curve_width if args.steps_curve_width in widths else widths[len(widths) // 2]
    settings = InterpSettings(
        widths=widths, gamma_bars=tuple(args.gamma_bars), gamma=args.gamma, gamma_sweep=tuple(args.gamma_sweep),
        base_width=args.base_width, hidden_layers=args.depth, batch_size=args.batch_size,
        inference_steps=args.inference_steps, kappa_scale=args.kappa_scale, steps_curve=tuple(sorted(args.steps_curve)),
        steps_curve_width=curve_width, seeds=tuple(args.seeds))
    result = _run_and_write(run_interp, write_interp, format_interp, settings, args)
    failed = [c for c in result["checks"] if not c["passed"]]
    if failed:
        print(f"pcfast interp: {len(failed)} acceptance check(s) failed (see the hints above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- plot


def _plot_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="draw the figure of a results JSON again (transfer, interp, coordcheck, traces, train), without "
                     "recomputing",
        description=("Read a results file written by pcfast transfer, interp, coordcheck or traces (or a train result: "
                     "pcfast.experiments.train.train_result) and draw its figure "
                     "again: the figure is a function of the JSON alone. Writes the PNG next to the JSON, with the "
                     "same stem, or under --out."))
    p.add_argument("result", type=Path, metavar="RESULT.json", help="a results JSON")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="directory for the PNG (default: the JSON's)")
    p.set_defaults(func=_plot)


def _plot(args) -> int:
    from ..experiments.coordcheck import plot_coordcheck
    from ..experiments.interp import plot_interp
    from ..experiments.traces import plot_traces
    from ..experiments.train import plot_train
    from ..experiments.transfer import plot_transfer

    path = args.result
    if not path.is_file():
        raise UsageError(f"RESULT.json: {path} is not a file")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"RESULT.json: cannot read {path} as JSON ({exc})") from None
    plotters = {"transfer": plot_transfer, "interp": plot_interp, "coordcheck": plot_coordcheck,
                "traces": plot_traces, "train": plot_train}
    kind = result.get("experiment") if isinstance(result, dict) else None
    if kind not in plotters:
        raise UsageError(f"RESULT.json: {path} is not a result of {', '.join(plotters)} "
                         f"(its 'experiment' is {kind!r})")
    out = args.out if args.out is not None else path.parent
    target = path.with_suffix(".png").name
    check_plotting()
    prepare_output_dir(out, [target])
    try:
        written = plotters[kind](result, out / target)
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise UsageError(f"RESULT.json: {path} lacks what the {kind} figure needs "
                         f"({type(exc).__name__}: {exc})") from None
    print(f"wrote {written}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="pcfast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Local learning rules under muP: train, sweep and check.",
        epilog="Run 'pcfast COMMAND --help' for a command's options and defaults.\n\nexit status: 0 done; 1 the "
               "run finished but failed (a training run diverged, an interp check failed) or its data or files "
               "could not be read or written; 2 a usage error (nothing computed); 3 an internal error; 130 "
               "interrupted.")
    parser.add_argument("--version", action="version", version=f"pcfast {__version__}")
    # Every command's parser: one-line errors, defaults in --help.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=functools.partial(_Parser, formatter_class=_Formatter))
    _train_parser(sub)
    _transfer_parser(sub)
    _coordcheck_parser(sub)
    _interp_parser(sub)
    _traces_parser(sub)
    _plot_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``pcfast`` command: the exit status (``EXIT_*``); one ``pcfast COMMAND: error: …`` line on
    stderr for every failure, never a traceback (``PCFAST_DEBUG=1`` re-raises instead)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command, for results files
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    from ..data import DatasetError
    from ..errors import DivergenceError

    debug = bool(os.environ.get("PCFAST_DEBUG"))
    began = time.perf_counter()
    prefix = f"pcfast {args.command}: error:"
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print(f"pcfast {args.command}: interrupted after {time.perf_counter() - began:.0f} s", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, (DatasetError, DivergenceError)):
            print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
                text in str(exc) for text in ("can't allocate memory", "out of memory"))):
            print(f"{prefix} out of memory ({_one_line(exc)[:160]}); use a smaller --width, --batch-size or "
                  "--train-size", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, RuntimeError) and "without overflow" in str(exc):
            print(f"{prefix} the computation overflowed its dtype ({_one_line(exc)}); use a smaller --lr",
                  file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, OSError):
            print(f"{prefix} {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(exc, (ValueError, TypeError)):
            print(f"{prefix} {_one_line(exc)} (set PCFAST_DEBUG=1 for the traceback)", file=sys.stderr)
            return EXIT_USAGE
        print(f"{prefix} unexpected {type(exc).__name__}: {_one_line(exc)} (a bug in pcfast: set PCFAST_DEBUG=1 "
              "for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    return code


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
