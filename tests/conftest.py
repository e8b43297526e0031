"""Shared fixtures: small real nets (plain torch modules, converted by the tests), the real-data folder, seeding."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # One intra-op thread unless SLIM_TEST_THREADS says otherwise: the test tensors are small, and on a shared
    # 2-core machine OpenMP's second thread waits for a busy core on every op (measured: a MobileNetV2 forward
    # 3.1 s with 2 threads vs 0.017 s with 1 while another process ran).
    torch.set_num_threads(int(os.environ.get("SLIM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def slim_data() -> Path:
    """The read-only real-data folder: ``$SLIM_DATA``, default ``<repo>/../shared/data``."""
    return Path(os.environ.get("SLIM_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class TinyCNN(nn.Module):
    """conv-bn-relu stem, a residual block with a depthwise conv, global pool, linear head.

    Covers the channel rules of DESIGN rule 1: input-decided in-channels, depthwise following its input, a residual
    add, flatten -> linear. Input ``(N, 3, H, W)`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, c1: int = 16, c2: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.dw = nn.Conv2d(c2, c2, 3, padding=1, groups=c2, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.pw = nn.Conv2d(c2, c2, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = torch.relu(self.bn3(self.dw(x)))
        y = self.bn4(self.pw(y))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


class ConvBNNet(nn.Module):
    """The smallest calibration subject: conv -> BN -> relu -> conv -> BN -> pool -> linear."""

    def __init__(self, c1: int = 16, c2: int = 24, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class NoBNNet(nn.Module):
    """conv-relu-conv-relu-linear without BN: train-mode outputs do not depend on the batch (used for gradients)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class _GatedBlock(nn.Module):
    """A residual block whose forward branches on the data: torch.fx cannot trace it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent python control flow
            y = torch.relu(y)
        return x + y


class UntraceableNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.block = _GatedBlock(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.block(x)
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def make_tiny_cnn():
    return TinyCNN


@pytest.fixture
def make_convbn_net():
    return ConvBNNet


@pytest.fixture
def make_nobn_net():
    return NoBNNet


@pytest.fixture
def make_untraceable_net():
    return UntraceableNet


@torch.no_grad()
def warm_bn(model, x, widths):
    """Train-mode forwards at ``widths`` (US mode tracks running statistics for min and max only)."""
    import slim_plugins as slim

    was = model.training
    model.train()
    for w in widths:
        with slim.width(w):
            model(x)
    model.train(was)
    return model


@pytest.fixture
def warm():
    return warm_bn


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


@pytest.fixture
def mad():
    return max_abs_diff


def masked_reference(model, w, x):
    """Output of the *full-width* model whose every conv/linear reads only the input channels the width-``w``
    sub-network uses (the others zeroed), from ``slim.active_channels``. If the narrow net is an exact
    sub-network (DESIGN rule 1), its output equals this. Needs a BN mode whose statistics are shared across
    widths (``naive``), so both see the same normalisation."""
    import copy

    import slim_plugins as slim

    chans = slim.active_channels(model, w)
    ref = copy.deepcopy(model).eval()
    mods = dict(ref.named_modules())
    for name, (cin, _) in chans.items():
        m = mods[name]
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        full_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        mask = torch.zeros(full_in, dtype=x.dtype)
        mask[cin] = 1

        def pre(mod, args, mask=mask):
            t = args[0]
            return (t * mask.view(1, -1, *([1] * (t.dim() - 2))),)

        m.register_forward_pre_hook(pre)
    with torch.no_grad(), slim.width(slim.width_spec(ref).max):
        return ref(x)


@pytest.fixture
def masked_ref():
    return masked_reference
