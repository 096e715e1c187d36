"""GNT in float16 and bfloat16: the Gauss–Newton targets' pseudo-inverse runs in float32 (torch has
no half-precision ``linalg.pinv``). Oracle: the same GNT step in float32 on the same numbers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pcfast
from pcfast.testing import tolerance


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gnt_steps_in_half_precision_like_float32(dtype):
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)
    narrow = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    narrow.load_state_dict({k: v.to(dtype) for k, v in wide.state_dict().items()})
    wide.load_state_dict({k: v.to(dtype).float() for k, v in wide.state_dict().items()})  # the same numbers
    low = pcfast.optim.GNT(narrow, None, lr=0.05).step(x, y)
    high = pcfast.optim.GNT(wide, None, lr=0.05).step(x.float(), y.float())
    tol = tolerance(dtype)
    assert low["loss"] == pytest.approx(high["loss"], rel=tol.rtol, abs=tol.atol)
    for p, q in zip(narrow.parameters(), wide.parameters()):
        torch.testing.assert_close(p.float(), q, rtol=tol.rtol, atol=tol.atol)
