"""``pcfast interp`` end to end on tiny widths, and the closed-form equilibrium it is checked against."""
from __future__ import annotations

import json

import pytest
import torch

import pcfast
from pcfast.experiments.interp import _inference_lr, closed_form_pc_grads
from pcfast.mup import make_mlp

pytest.importorskip("matplotlib", reason="figures need matplotlib")


def test_closed_form_equilibrium_equals_a_long_relaxation():
    torch.manual_seed(0)
    model = make_mlp(7, 13, 3, hidden_layers=3, activation="identity", bias=False).double()
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=4, gamma_bar=-1.0)
    weights = [m.weight.detach() for m in model if isinstance(m, torch.nn.Linear)]
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    relaxed = pcfast.functional.pc_train_step(weights, [None] * 4, ["identity"] * 3, x, y, precisions=par.precisions,
                                              inference_steps=3000,
                                              inference_lr=_inference_lr(weights, par.precisions, 0.9), backend="torch")
    for exact, got in zip(closed_form_pc_grads(weights, x, y, par.precisions), relaxed.weight_grads):
        torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-10)


def test_interp_writes_cosines_and_checks(tmp_path, pcfast_cli):
    proc = pcfast_cli("interp", "--widths", "32", "128", "--base-width", "32", "--gamma-bars", "0", "-1",
                      "--gamma-sweep", "0.01", "10", "--batch-size", "16", "--inference-steps", "200",
                      "--steps-curve", "0", "1", "10", "--steps-curve-width", "32", "--seeds", "0", "--no-progress",
                      "--out", tmp_path)
    result = json.loads((tmp_path / "interp.json").read_text())
    # Widths up to 128 leave cos(PC, GD) below 0.99 at γ̄ = 0: that check fails, exits 1 and says what fixes it.
    verdict = {c["check"].split(":")[0]: c["passed"] for c in result["checks"]}
    assert verdict == {"gamma_bar 0": False, "gamma_bar -1, smallest width": True, "relaxed PC update matches the "
                       "closed-form equilibrium (relative error < 1e-3)": True}
    assert proc.returncode == 1, proc.stderr
    assert "[FAIL] gamma_bar 0" in proc.stdout and "hint: PC reaches GD only at large width" in proc.stdout
    assert "1 acceptance check(s) failed" in proc.stderr and "Traceback" not in proc.stderr
    assert len(result["records"]) == 2 * 2
    summary = {(e["gamma_bar"], e["width"]): e for e in result["summary"]}
    assert set(summary) == {(0.0, 32), (0.0, 128), (-1.0, 32), (-1.0, 128)}
    for e in summary.values():
        assert -1 <= e["cos_pc_gd"] <= 1 and -1 <= e["cos_pc_gnt"] <= 1
        assert len(e["cos_pc_gd_layers"]) == 3
        assert e["max_rel_error_vs_closed_form"] < 1e-3
    # At the base width every γ̄ gives the same γ_L = γ, hence the same update.
    assert summary[(0.0, 32)]["cos_pc_gd"] == pytest.approx(summary[(-1.0, 32)]["cos_pc_gd"])
    # Wider: γ̄ = 0 moves toward GD; γ̄ = −1 keeps C_γ = Θ(1) and stays further from it.
    assert summary[(0.0, 128)]["cos_pc_gd"] > summary[(0.0, 32)]["cos_pc_gd"]
    assert summary[(0.0, 128)]["cos_pc_gd"] > summary[(-1.0, 128)]["cos_pc_gd"]
    # γ_L → 0 is GD (O4); a large γ_L turns the first layer's update (its input x is fixed) toward
    # Gauss–Newton (O5).
    small, large = result["gamma_records"][0], result["gamma_records"][-1]
    assert min(small["cos_pc"]["gd"]) > 0.999
    assert large["cos_pc"]["gnt"][0] > large["cos_pc"]["gd"][0] + 0.02
    curve = next(r["curve"] for r in result["records"] if "curve" in r)
    assert [p["steps"] for p in curve] == [0, 1, 10]
    assert {c["check"].split(":")[0] for c in result["checks"]} >= {"gamma_bar 0", "gamma_bar -1, smallest width"}
    assert (tmp_path / "interp.png").read_bytes()[:4] == b"\x89PNG"


def test_interp_rejects_bad_settings(tmp_path, pcfast_main):
    code, _, err = pcfast_main("interp", "--gamma-bars", "0.5", "--out", tmp_path)
    assert code == 2 and "[-1, 0]" in err
    code, _, err = pcfast_main("interp", "--kappa-scale", "3", "--out", tmp_path)
    assert code == 2 and "--kappa-scale" in err


@pytest.mark.parametrize("passed, status", [(True, 0), (False, 1)])
def test_interp_exit_status_follows_its_checks(tmp_path, pcfast_main, monkeypatch, passed, status):
    from pcfast.experiments import interp

    check = {"check": "relaxed PC update matches the closed-form equilibrium (relative error < 1e-3)",
             "passed": passed, "value": 0.5, "hint": "the relaxation has not settled: raise --inference-steps"}
    monkeypatch.setattr(interp, "run_interp", lambda settings, show_progress=True: {"checks": [check], "seconds": 0.0})
    monkeypatch.setattr(interp, "write_interp", lambda result, out: [])
    original = interp.format_interp
    monkeypatch.setattr(interp, "format_interp", lambda result: original({"summary": [], **result}))
    code, out, _ = pcfast_main("interp", "--out", tmp_path)
    assert code == status
    assert ("hint: the relaxation has not settled" in out) is (not passed)
