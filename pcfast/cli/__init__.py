"""The ``pcfast`` console command.

    pcfast train [--algo pc bp dtp] [--epochs 8] [--width 256] ...   train on the embedded MNIST subset

Each subcommand prints progress on long work and ``--help`` says what every option does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ALGOS = ("bp", "pc", "tp", "dtp")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one or more algorithms on a dataset and report accuracy",
                       description="Train an MLP with PC, TP, DTP or BP under SP or muP in a plain loop; "
                                   "log loss, accuracy and energy per epoch.")
    p.add_argument("--algo", nargs="+", choices=ALGOS, default=["pc", "bp"], help="algorithms to train (default: pc bp)")
    p.add_argument("--dataset", default="mnist5k", help="mnist5k (embedded, default), digits, mnist, fashion_mnist, cifar10")
    p.add_argument("--root", default=None, help="directory holding dataset files (mnist, fashion_mnist, cifar10)")
    p.add_argument("--preset", choices=("sp", "mup"), default="mup", help="parametrization (default: mup)")
    p.add_argument("--base-width", type=int, default=64, help="width at which muP equals SP (default: 64)")
    p.add_argument("--gamma-bar", type=float, default=0.0, help="PC output-precision exponent in [-1, 0] (default: 0)")
    p.add_argument("--width", type=int, default=256, help="hidden width (default: 256)")
    p.add_argument("--depth", type=int, default=2, help="number of hidden layers (default: 2)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu", "sigmoid", "gelu"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.03, help="base learning rate (default: 0.03)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--loss", choices=("mse", "ce"), default="mse")
    p.add_argument("--inference-steps", type=int, default=20, help="PC relaxation steps T (default: 20)")
    p.add_argument("--inference-lr", type=float, default=0.2, help="PC inference rate kappa (default: 0.2)")
    p.add_argument("--beta", type=float, default=0.5, help="TP/DTP output target step (default: 0.5)")
    p.add_argument("--feedback-lr", type=float, default=0.1, help="TP/DTP feedback learning rate (default: 0.1)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton", "reference"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the per-epoch log to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)


def _train(args) -> int:
    import torch

    from .. import optim, parametrize
    from ..data import iterate_batches, load_dataset
    from ..mup import make_mlp

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    data = load_dataset(args.dataset, root=args.root)
    print(f"{data!r}")
    log = []
    for algo in args.algo:
        torch.manual_seed(args.seed)
        model = make_mlp(data.num_features, args.width, data.num_classes, hidden_layers=args.depth, activation=args.activation)
        par = parametrize(model, args.preset, algo=algo, base_width=args.base_width, gamma_bar=args.gamma_bar,
                          generator=torch.Generator().manual_seed(args.seed))
        common = dict(lr=args.lr, momentum=args.momentum, loss=args.loss, backend=args.backend)
        extra = {
            "pc": dict(inference_steps=args.inference_steps, inference_lr=args.inference_lr),
            "tp": dict(beta=args.beta, feedback_lr=args.feedback_lr, seed=args.seed),
            "dtp": dict(beta=args.beta, feedback_lr=args.feedback_lr, seed=args.seed),
        }.get(algo, {})
        if algo == "bp":
            common.pop("backend")
        opt = {"pc": optim.PC, "bp": optim.BP, "tp": optim.TP, "dtp": optim.DTP}[algo](model, par, **common, **extra)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        steps_per_epoch = -(-data.num_train // args.batch_size)
        bar = None if (args.no_progress or tqdm is None) else tqdm(total=args.epochs * steps_per_epoch, desc=algo, unit="step", leave=False)
        start = time.perf_counter()
        for epoch in range(args.epochs):
            totals: dict[str, float] = {}
            count = 0
            for x, y in iterate_batches(data.x_train, data.y_train, args.batch_size,
                                        generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)):
                opt.zero_grad()
                stats = opt.step(x, y)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
                if bar is not None:
                    bar.update()
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
            schedule.step()
            with torch.no_grad():
                accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
            entry = {"algo": algo, "epoch": epoch + 1, "test_accuracy": accuracy,
                     "seconds": time.perf_counter() - start, **{k: v / count for k, v in totals.items()}}
            log.append(entry)
            line = f"{algo:>4} epoch {epoch + 1:>2}/{args.epochs}: test accuracy {accuracy:.3f}, " + \
                   ", ".join(f"{k} {v / count:.4f}" for k, v in totals.items())
            (bar.write if bar is not None else print)(line)
        if bar is not None:
            bar.close()
        print(f"{algo}: final test accuracy {log[-1]['test_accuracy']:.3f} in {log[-1]['seconds']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(log, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcfast", description="Local learning rules under muP: train, sweep and check.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
