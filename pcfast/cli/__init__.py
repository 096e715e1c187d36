"""The ``pcfast`` console command.

    pcfast train       train PC, TP, DTP or BP on a dataset, logging loss, accuracy and energy per epoch
    pcfast transfer    learning-rate × width sweep per algorithm and parametrization (μTransfer)
    pcfast coordcheck  per-layer update size against width (the coordinate check)
    pcfast interp      PC's update between GD and Gauss–Newton in deep linear networks

Every subcommand shows progress bars on long work (``--no-progress`` turns them off), writes its
results under ``--out`` and lists every option with its default in ``--help``. The work itself lives
in :mod:`pcfast.experiments`; this module only parses arguments and reports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ALGOS = ("bp", "pc", "tp", "dtp")
VARIANTS_HELP = "bp, pc (PC with gamma_bar 0), pc:G (PC with gamma_bar G in [-1, 0], e.g. pc:-1), tp, dtp"
DEFAULT_OUT = Path("experiments/results")


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

def _widths(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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


# ---------------------------------------------------------------------------------------------- train


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one or more algorithms on a dataset and report accuracy",
                       formatter_class=_Formatter,
                       description="Train an MLP with PC, TP, DTP or BP under SP or muP in a plain loop (cosine "
                                   "learning-rate schedule); log loss, accuracy and energy per epoch.")
    p.add_argument("--algo", nargs="+", choices=ALGOS, default=["pc", "bp"], help="algorithms to train")
    p.add_argument("--dataset", default="mnist5k", help="mnist5k (embedded), digits (embedded), mnist, fashion_mnist, cifar10")
    p.add_argument("--root", default=None, help="directory holding dataset files (mnist, fashion_mnist, cifar10)")
    p.add_argument("--preset", choices=("sp", "mup"), default="mup", help="parametrization")
    p.add_argument("--base-width", type=_positive_int, default=64, help="width at which muP equals SP")
    p.add_argument("--gamma-bar", type=float, default=0.0, help="PC output-precision exponent in [-1, 0]")
    p.add_argument("--width", type=_widths, default=256, help="hidden width")
    p.add_argument("--depth", type=_positive_int, default=2, help="number of hidden layers")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu", "sigmoid", "gelu"), help="hidden activation")
    p.add_argument("--epochs", type=_positive_int, default=8, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="minibatch size")
    p.add_argument("--lr", type=float, default=0.03, help="base learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse", help="output loss")
    p.add_argument("--inference-steps", type=int, default=20, help="PC relaxation steps T")
    p.add_argument("--inference-lr", type=float, default=0.2, help="PC inference rate kappa")
    p.add_argument("--beta", type=float, default=0.5, help="TP/DTP output target step")
    p.add_argument("--feedback-lr", type=float, default=0.1, help="TP/DTP feedback learning rate")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton", "reference"),
                   help="compute backend")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="train on the first N training images (default: all)")
    p.add_argument("--json", type=Path, default=None, help="write the per-epoch log to this JSON file")
    _add_common(p, out=False)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from ..experiments import run_train

    log = run_train(
        args.algo, dataset=args.dataset, root=args.root, preset=args.preset, base_width=args.base_width,
        gamma_bar=args.gamma_bar, width=args.width, depth=args.depth, activation=args.activation,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, loss=args.loss,
        inference_steps=args.inference_steps, inference_lr=args.inference_lr, beta=args.beta,
        feedback_lr=args.feedback_lr, backend=args.backend, seed=args.seed, train_size=args.train_size,
        device=args.device, show_progress=not args.no_progress)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(log, indent=1))
    return 1 if any(e.get("diverged") for e in log) else 0


# ------------------------------------------------------------------------------------------- transfer


def _transfer_parser(sub) -> None:
    from ..experiments.transfer import PRESETS

    quick, medium, full = PRESETS["quick"], PRESETS["medium"], PRESETS["full"]
    p = sub.add_parser(
        "transfer", help="learning-rate x width sweep per algorithm and parametrization (muTransfer)",
        formatter_class=_Formatter,
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
    p.add_argument("--algo", nargs="+", type=_variant, default=None, metavar="ALGO",
                   help=f"algorithm variants: {VARIANTS_HELP} (default: bp pc pc:-1 tp dtp)")
    p.add_argument("--parametrization", nargs="+", choices=("sp", "mup"), default=None,
                   help="parametrizations (default: sp mup)")
    p.add_argument("--widths", nargs="+", type=_widths, default=None, help="hidden widths (default: the preset's)")
    p.add_argument("--log2-lr", nargs=2, type=int, default=None, metavar=("LO", "HI"),
                   help="learning-rate grid 2^LO ... 2^HI for every algorithm (default: per algorithm, see "
                        "pcfast.experiments.transfer.DEFAULT_GRIDS)")
    p.add_argument("--dataset", default=None, help="mnist5k, digits, mnist, fashion_mnist, cifar10 (default: the preset's)")
    p.add_argument("--root", default=None, help="directory holding dataset files")
    p.add_argument("--train-size", type=_positive_int, default=None, help="train on the first N training images (default: the preset's)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help=f"minibatch size (default: {quick.batch_size})")
    p.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default: {quick.momentum})")
    p.add_argument("--base-width", type=_positive_int, default=None, help=f"width where muP equals SP (default: {quick.base_width})")
    p.add_argument("--readout-scale", type=float, default=None,
                   help="factor on the readout init for every algorithm (default: per algorithm, "
                        + ", ".join(f"{k} {v:g}" for k, v in quick.readout_scales.items()) + ")")
    p.add_argument("--inference-steps", type=int, default=None, help="PC relaxation steps T (default: the preset's)")
    p.add_argument("--inference-lr", type=float, default=None, help=f"PC inference rate kappa (default: {quick.inference_lr})")
    p.add_argument("--beta", type=float, default=None, help=f"TP/DTP output target step (default: {quick.beta})")
    p.add_argument("--feedback-lr", type=float, default=None, help=f"TP/DTP feedback learning rate (default: {quick.feedback_lr})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"init and batch-order seeds; losses are averaged over them (default: {' '.join(map(str, quick.seeds))})")
    p.add_argument("--backend", default=None, choices=("auto", "torch", "cpp", "triton", "reference"),
                   help="compute backend (default: auto: triton on a GPU, cpp on CPU when built, else torch)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--name", default=None, help="file stem transfer_<NAME> (default: the preset's name)")
    _add_common(p)
    p.set_defaults(func=_transfer)


def _transfer(args) -> int:
    from ..experiments.transfer import (
        format_summary,
        run_transfer,
        settings_for,
        write_transfer,
    )

    overrides = {
        "dataset": args.dataset, "root": args.root, "widths": tuple(args.widths) if args.widths else None,
        "variants": tuple(args.algo) if args.algo else None,
        "parametrizations": tuple(args.parametrization) if args.parametrization else None,
        "train_size": args.train_size, "epochs": args.epochs, "batch_size": args.batch_size,
        "momentum": args.momentum, "base_width": args.base_width, "inference_steps": args.inference_steps,
        "inference_lr": args.inference_lr, "beta": args.beta, "feedback_lr": args.feedback_lr,
        "seeds": tuple(args.seeds) if args.seeds else None, "backend": args.backend, "name": args.name,
        "device": args.device,
    }
    preset = getattr(args, "preset", "quick")
    settings = settings_for(preset, **overrides)
    if args.dataset is not None:
        settings.fallback_dataset = None  # a dataset asked for by name is used, or reported missing
    if args.log2_lr:
        lo, hi = sorted(args.log2_lr)
        settings.grids = {v: (lo, hi) for v in settings.variants}
    if args.readout_scale is not None:
        if not args.readout_scale > 0:
            raise ValueError(f"--readout-scale: expected a number > 0, got {args.readout_scale:g}")
        settings.readout_scales = {v: args.readout_scale for v in settings.variants}
    print(f"pcfast transfer ({preset}): {len(settings.variants)} algorithms x {len(settings.parametrizations)} "
          f"parametrizations x widths {list(settings.widths)}; results in {args.out}/")
    result = run_transfer(settings, show_progress=not args.no_progress)
    paths = write_transfer(result, args.out)
    print(format_summary(result))
    print(f"{result['runs_trained']} runs trained ({len(result['rows'])} configurations) in {result['seconds']:.0f} s; "
          "wrote " + ", ".join(str(p) for p in paths))
    return 0


# ----------------------------------------------------------------------------------------- coordcheck


def _coordcheck_parser(sub) -> None:
    from ..experiments.coordcheck import CoordSettings

    d = CoordSettings()
    p = sub.add_parser(
        "coordcheck", help="per-layer update size against width, per algorithm and parametrization",
        formatter_class=_Formatter,
        description=("Measure each layer's pre-activation change Delta u_l and activation size over the first steps "
                     "across widths (pcfast.coord_check, the core test's settings); write coordcheck.json and "
                     "coordcheck.png under --out and print the width slopes. Under muP every slope should be ~0."))
    p.add_argument("--algo", nargs="+", type=_variant, default=list(d.variants), metavar="ALGO", help=VARIANTS_HELP)
    p.add_argument("--parametrization", nargs="+", choices=("sp", "mup"), default=list(d.parametrizations),
                   help="parametrizations")
    p.add_argument("--widths", nargs="+", type=_widths, default=list(d.widths), help="hidden widths (at least two)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps measured")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="init seeds; sizes are averaged")
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate")
    p.add_argument("--base-width", type=_positive_int, default=d.base_width, help="width at which muP equals SP")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="fixed batch of pixel-like inputs")
    p.add_argument("--readout-scale", type=float, default=d.readout_scale, help="factor on the readout init")
    p.add_argument("--inference-steps", type=int, default=d.inference_steps, help="PC relaxation steps T")
    p.add_argument("--inference-lr", type=float, default=d.inference_lr, help="PC inference rate kappa")
    p.add_argument("--backend", default=d.backend, choices=("auto", "torch", "cpp", "triton", "reference"),
                   help="compute backend")
    _add_common(p)
    p.set_defaults(func=_coordcheck)


def _coordcheck(args) -> int:
    from ..experiments.coordcheck import (
        CoordSettings,
        format_coordcheck,
        run_coordcheck,
        write_coordcheck,
    )

    settings = CoordSettings(
        variants=tuple(args.algo), parametrizations=tuple(args.parametrization), widths=tuple(args.widths),
        steps=args.steps, seeds=tuple(args.seeds), base_width=args.base_width, lr=args.lr,
        batch_size=args.batch_size, readout_scale=args.readout_scale, inference_steps=args.inference_steps,
        inference_lr=args.inference_lr, backend=args.backend)
    if len(settings.widths) < 2:
        raise ValueError("--widths: need at least two widths to measure a slope")
    result = run_coordcheck(settings, show_progress=not args.no_progress)
    paths = write_coordcheck(result, args.out)
    print(format_coordcheck(result))
    print(f"done in {result['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


# --------------------------------------------------------------------------------------------- interp


def _interp_parser(sub) -> None:
    from ..experiments.interp import InterpSettings

    d = InterpSettings()
    p = sub.add_parser(
        "interp", help="cosine of PC's update with GD and Gauss-Newton in deep linear networks",
        formatter_class=_Formatter,
        description=("Deep linear networks under muP with output precision gamma_L = gamma * m^(-gamma_bar): relax "
                     "PC (float64, backend torch) and compare its weight update with the GD gradient and the "
                     "Gauss-Newton-target direction by cosine, against width, gamma_bar, inference steps and "
                     "gamma; each relaxed update is checked against the closed-form equilibrium. Writes interp.json "
                     "and interp.png under --out."))
    p.add_argument("--widths", nargs="+", type=_widths, default=list(d.widths), help="hidden widths")
    p.add_argument("--gamma-bars", nargs="+", type=float, default=list(d.gamma_bars), help="values of gamma_bar in [-1, 0]")
    p.add_argument("--gamma", type=float, default=d.gamma, help="output precision at the base width")
    p.add_argument("--gamma-sweep", nargs="+", type=float, default=list(d.gamma_sweep),
                   help="values of gamma for the interpolation panel, at the smallest width")
    p.add_argument("--base-width", type=_positive_int, default=d.base_width, help="width at which muP equals SP")
    p.add_argument("--depth", type=_positive_int, default=d.hidden_layers, help="number of hidden layers")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="images from mnist5k")
    p.add_argument("--inference-steps", type=_positive_int, default=d.inference_steps, help="PC relaxation steps T")
    p.add_argument("--kappa-scale", type=float, default=d.kappa_scale,
                   help="inference rate kappa = SCALE / (1 + max_l gamma_(l+1) ||W_(l+1)||^2)")
    p.add_argument("--steps-curve", nargs="+", type=int, default=list(d.steps_curve), help="T values of the steps panel")
    p.add_argument("--steps-curve-width", type=_widths, default=d.steps_curve_width, help="width of the steps panel")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="init seeds; cosines are averaged")
    _add_common(p)
    p.set_defaults(func=_interp)


def _interp(args) -> int:
    from ..experiments.interp import (
        InterpSettings,
        format_interp,
        run_interp,
        write_interp,
    )

    for g in args.gamma_bars:
        if not -1.0 <= g <= 0.0:
            raise ValueError(f"--gamma-bars: every value must lie in [-1, 0], got {g:g}")
    if not 0.0 < args.kappa_scale < 2.0:
        raise ValueError(f"--kappa-scale: expected a value in (0, 2) for a stable relaxation, got {args.kappa_scale:g}")
    if any(t < 0 for t in args.steps_curve):
        raise ValueError("--steps-curve: step counts must be >= 0")
    widths = tuple(sorted(args.widths))
    curve_width = args.steps_curve_width if args.steps_curve_width in widths else widths[len(widths) // 2]
    settings = InterpSettings(
        widths=widths, gamma_bars=tuple(args.gamma_bars), gamma=args.gamma, gamma_sweep=tuple(args.gamma_sweep),
        base_width=args.base_width, hidden_layers=args.depth, batch_size=args.batch_size,
        inference_steps=args.inference_steps, kappa_scale=args.kappa_scale, steps_curve=tuple(sorted(args.steps_curve)),
        steps_curve_width=curve_width, seeds=tuple(args.seeds))
    result = run_interp(settings, show_progress=not args.no_progress)
    paths = write_interp(result, args.out)
    print(format_interp(result))
    print(f"done in {result['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcfast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Local learning rules under muP: train, sweep and check.",
        epilog="Run 'pcfast COMMAND --help' for a command's options and defaults.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _transfer_parser(sub)
    _coordcheck_parser(sub)
    _interp_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from ..data import DatasetError

    began = time.perf_counter()
    try:
        code = args.func(args)
    except DatasetError as exc:
        print(f"pcfast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        if os.environ.get("PCFAST_DEBUG"):
            raise
        print(f"pcfast {args.command}: error: {exc} (set PCFAST_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pcfast {args.command}: interrupted after {time.perf_counter() - began:.0f} s", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
