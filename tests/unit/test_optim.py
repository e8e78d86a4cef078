"""common/optim.py: torch.optim.AdamW + OneCycleLR's training, bit for bit,
without importing torch._dynamo."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.optim import AdamW, OneCycle

ROOT = Path(__file__).resolve().parents[2]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.GroupNorm(2, 4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    )


def _train(model, opt, steps, before=lambda: None, after=lambda: None):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = (
            torch.randn(8, 1, 8, 8, generator=g),
            torch.randint(0, 5, (8,), generator=g),
        )
        before()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        after()


@pytest.mark.parametrize("total", [1, 2, 7, 40])
def test_adamw_with_one_cycle_is_torch_optim_bit_for_bit(total):
    ref_net, our_net = _net(), _net()
    ref = torch.optim.AdamW(ref_net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        ref, max_lr=2e-3, total_steps=total, pct_start=0.15
    )
    ours = AdamW(
        our_net.parameters(),
        lr=2e-3,
        weight_decay=1e-4,
        schedule=OneCycle(2e-3, total, pct_start=0.15),
    )
    used: list[tuple[float, float]] = []  # (lr, beta1) of each torch step

    def record() -> None:
        group = ref.param_groups[0]
        used.append((group["lr"], group["betas"][0]))

    _train(ref_net, ref, total, before=record, after=sched.step)
    _train(our_net, ours, total)
    for p, q in zip(ref_net.parameters(), our_net.parameters(), strict=True):
        assert torch.equal(p, q)
    # the schedule itself, step by step: the same floats
    assert [ours.schedule.at(k) for k in range(total)] == used
    assert ours.steps == total


def test_adamw_alone_is_torch_optim_and_skips_parameters_without_gradients():
    ref_net, our_net = _net(), _net()
    for net in (ref_net, our_net):
        net[1].weight.requires_grad_(False)  # frozen: never updated
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2)
    ours = AdamW(our_net.parameters(), lr=1e-2)
    _train(ref_net, ref, 5)
    _train(our_net, ours, 5)
    for p, q in zip(ref_net.parameters(), our_net.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(our_net[1].weight, _net()[1].weight)
    assert our_net[1].weight not in ours.state


def test_adamw_without_decay_is_torch_adam():
    """DOSFL's and FedBiP's optimiser: Adam (betas as DOSFL's, 0.5 and 0.999)."""
    ref_net, our_net = _net(), _net()
    ref = torch.optim.Adam(ref_net.parameters(), lr=1e-2, betas=(0.5, 0.999))
    ours = AdamW(our_net.parameters(), lr=1e-2, betas=(0.5, 0.999), weight_decay=0.0)
    _train(ref_net, ref, 6)
    _train(our_net, ours, 6)
    for p, q in zip(ref_net.parameters(), our_net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_one_cycle_by_hand():
    s = OneCycle(max_lr=1.0, total_steps=21, pct_start=0.5, div_factor=10.0,
                 final_div_factor=100.0)  # fmt: skip
    # phase 1 ends at step 0.5 * 21 - 1 = 9.5; phase 2 at step 20
    lr, m = s.at(0)
    assert lr == pytest.approx(0.1) and m == pytest.approx(0.95)
    lr, m = s.at(9.5)  # the top of the cycle
    assert lr == pytest.approx(1.0) and m == pytest.approx(0.85)
    # halfway up: (start + end) / 2 (cos(pi/2) = 0)
    assert s.at(4.75)[0] == pytest.approx(0.55)
    assert s.at(4.75)[1] == pytest.approx(0.90)
    lr, m = s.at(20)  # the end: max_lr / 10 / 100, momentum back up
    assert lr == pytest.approx(1e-3) and m == pytest.approx(0.95)
    assert all(s.at(k)[0] >= s.at(k + 1)[0] for k in range(10, 20))
    assert all(s.at(k)[0] <= s.at(k + 1)[0] for k in range(0, 9))
    # one step: the rise has no length, the single step is the fall's start
    assert OneCycle(1.0, 1, pct_start=0.15).at(0)[0] == pytest.approx(1.0 / 25 / 1e4)
    assert math.isfinite(OneCycle(1.0, 4, pct_start=0.25).at(0)[0])  # 0/0 in torch


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="total_steps=0"):
        OneCycle(1e-3, 0)
    with pytest.raises(ValueError, match="pct_start=1.5"):
        OneCycle(1e-3, 10, pct_start=1.5)
    with pytest.raises(ValueError, match="step 11 outside"):
        OneCycle(1e-3, 10).at(11)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        AdamW(frozen.parameters())


def test_a_training_process_does_not_import_dynamo():
    """What common/optim.py is for: a ClientApp process that trains (local
    training, a LoRA adapter) imports neither torch._dynamo nor sympy."""
    code = (
        "import sys, torch\n"
        "from common.models import build_classifier\n"
        "from common.train import train_classifier\n"
        "m = build_classifier('cnn', 1, 3)\n"
        "x = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8)\n"
        "train_classifier(m, x, torch.arange(20) % 3, epochs=1, batch_size=8)\n"
        "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
