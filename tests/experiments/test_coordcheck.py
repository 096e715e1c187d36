"""``pcfast coordcheck`` end to end on tiny widths."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib")


def test_coordcheck_writes_slopes_per_layer_and_step(tmp_path, pcfast_cli):
    proc = pcfast_cli("coordcheck", "--algo", "bp", "pc:-1", "--widths", "16", "32", "64", "--base-width", "16",
                      "--steps", "2", "--seeds", "0", "--inference-steps", "3", "--no-progress", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "coordcheck.json").read_text())
    panels = {(p["variant"], p["preset"]): p for p in result["panels"]}
    assert set(panels) == {("bp", "sp"), ("bp", "mup"), ("pc:-1", "sp"), ("pc:-1", "mup")}
    bp_mup = panels[("bp", "mup")]
    assert bp_mup["widths"] == [16, 32, 64] and set(bp_mup["slopes"]) == {"1", "2"}
    assert len(bp_mup["slopes"]["1"]) == 3 and len(bp_mup["activation_slopes"]["2"]) == 3
    assert set(bp_mup["bias_slopes"]) == {"1", "2"} and len(bp_mup["bias_slopes"]["2"]) == 3
    assert len(bp_mup["records"]) == 3 * 2 * 3  # widths × steps × layers (one seed)
    assert all(r["delta_u"] > 0 and r["bias_step"] > 0 for r in bp_mup["records"])
    # The SP readout update grows like the width (slope ≈ 1) even on tiny widths; μP's does not.
    assert panels[("bp", "sp")]["slopes"]["1"][2] > 0.7
    assert abs(bp_mup["slopes"]["1"][2]) < 0.3
    checks = {c["check"]: c for c in result["checks"]}
    assert len(checks) == 4  # every panel is judged, γ̄_L = −1 under μP included
    for variant in ("bp", "pc:-1"):
        check = checks[f"mup {variant}: every weight's and bias's slope within ±0.15 at every step"]
        panel = panels[(variant, "mup")]
        every = [s for key in ("slopes", "bias_slopes") for step in panel[key].values() for s in step]
        assert check["value"] == [max(every, key=abs)] and check["passed"] == (max(map(abs, every)) <= 0.15)
    assert (tmp_path / "coordcheck.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 1:" in proc.stdout


def test_coordcheck_needs_two_widths(tmp_path, pcfast_main):
    code, _, err = pcfast_main("coordcheck", "--widths", "64", "--out", tmp_path)
    assert code == 2 and "--widths: need at least 2 distinct values" in err
