"""The μTransfer sweep on conv nets (``model="cnn"``): a tiny run end to end through the Python API,
and the model's place in the settings, the journal hash and the file names."""
from __future__ import annotations

import json

import pytest

from pcfast.experiments.sweep import JournalError, settings_hash
from pcfast.experiments.transfer import (
    CNN_PRESETS,
    PRESETS,
    checks,
    journal_path,
    journal_settings,
    run_transfer,
    settings_for,
    write_transfer,
)

pytest.importorskip("sklearn", reason="the 8x8 digits ship with scikit-learn")
pytest.importorskip("matplotlib", reason="figures need matplotlib")

# 2 widths × 2 learning rates, 1 epoch of 2 batches of 32 digits, PC T = 2, one seed.
TINY = dict(widths=(4, 8), base_width=4, train_size=64, epochs=1, batch_size=32, inference_steps=2, seeds=(0,),
            grids={"bp": (-4, -3), "pc": (-4, -3), "dtp": (-4, -3)}, device="cpu")


def test_tiny_cnn_sweep_writes_summary_checks_and_figure(tmp_path):
    settings = settings_for("quick", model="cnn", **TINY)
    result = run_transfer(settings, journal=journal_path(tmp_path, settings.name), show_progress=False)
    paths = write_transfer(result, tmp_path)
    assert [p.name for p in paths] == ["transfer_quick_cnn.json", "transfer_quick_cnn.csv", "transfer_quick_cnn.png"]
    written = json.loads(paths[0].read_text())
    assert written["settings"]["model"] == "cnn"
    assert written["data"] == {"dataset": "digits", "train_size": 64, "test_size": 359, "note": None,
                               "image_shape": [1, 8, 8]}
    rows = written["rows"]
    assert len(rows) == 3 * 2 * 2 * 2  # variants × parametrizations × widths × learning rates
    assert all(r["diverged"] or 0 < r["train_loss"] < 10 for r in rows)
    # At the base width μP is SP: those runs are one trial, shared.
    base = {(r["variant"], r["parametrization"], r["log2_lr"]): r for r in rows if r["width"] == 4}
    assert base[("pc", "mup", -4)]["train_loss"] == base[("pc", "sp", -4)]["train_loss"]
    assert result["runs_trained"] == 3 * 2 * (2 * 2 - 1)
    # The wider model is a different computation under both parametrizations, and SP and μP differ there.
    wide = {(r["variant"], r["parametrization"], r["log2_lr"]): r for r in rows if r["width"] == 8}
    assert wide[("bp", "mup", -4)]["train_loss"] != wide[("bp", "sp", -4)]["train_loss"]
    summary = {(e["variant"], e["parametrization"]): e for e in written["summary"]}
    assert set(summary) == {(v, p) for v in ("bp", "pc", "dtp") for p in ("sp", "mup")}
    assert [p["width"] for p in summary[("dtp", "mup")]["optimum"]] == [4, 8]
    names = [c["check"] for c in written["checks"]]
    assert names == [f"mup {v}: {what}" for v in ("bp", "pc", "dtp") for what in (
        "optimum moves by <= 1 grid step from smallest to largest width", "wider is better at the optimum")] + [
        "sp bp: optimum moves by >= 2 grid steps, or the widest model diverges at the muP optimum"]
    assert written["checks"] == checks(written["summary"])
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[2].stat().st_size > 10_000


def test_settings_hash_differs_between_mlp_and_cnn():
    mlp = settings_for("quick", **TINY, name="same")
    cnn = settings_for("quick", model="cnn", **TINY, name="same")
    cnn_fields = {k: v for k, v in cnn.as_dict().items() if k != "model"}
    mlp_like_cnn = settings_for("quick", **{**cnn_fields, "variants": tuple(cnn.variants)})
    assert mlp_like_cnn.as_dict() == cnn_fields  # the same settings but for the model
    assert "model" not in mlp.as_dict() and cnn.as_dict()["model"] == "cnn"
    assert settings_hash(journal_settings(mlp_like_cnn, "cpu")) != settings_hash(journal_settings(cnn, "cpu"))
    assert settings_hash(journal_settings(mlp, "cpu")) != settings_hash(journal_settings(cnn, "cpu"))


def test_mlp_journal_is_not_resumed_as_a_cnn_sweep(tmp_path):
    one = dict(TINY, variants=("bp",), parametrizations=("sp",), widths=(4,), grids={"bp": (-4, -4)}, name="shared")
    mlp = settings_for("quick", dataset="digits", **one)
    journal = journal_path(tmp_path, "shared")
    run_transfer(mlp, journal=journal, show_progress=False)
    assert len(journal.read_text().splitlines()) == 1
    cnn = settings_for("quick", model="cnn", **one)
    with pytest.raises(JournalError, match="model null there, \"cnn\" here"):
        run_transfer(cnn, journal=journal, resume=True, show_progress=False)
    assert len(journal.read_text().splitlines()) == 1  # nothing appended


def test_cnn_presets_are_named_apart_from_the_mlp_and_checked():
    assert {p.name for p in CNN_PRESETS.values()}.isdisjoint(p.name for p in PRESETS.values())
    assert all("cnn" in p.name and p.model == "cnn" for p in CNN_PRESETS.values())
    assert all(p.model == "mlp" for p in PRESETS.values())
    assert settings_for("quick", model=None).model == "mlp"
    with pytest.raises(ValueError, match="model: expected one of"):
        settings_for("quick", model="rnn")
    with pytest.raises(ValueError, match="preset: expected one of"):
        settings_for("huge", model="cnn")
    with pytest.raises(ValueError, match="dataset: model='cnn' trains on images"):
        settings_for("quick", model="cnn", dataset="iris")
