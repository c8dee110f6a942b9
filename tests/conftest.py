"""Shared test helpers: small 2D/3D networks with known structure."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny networks: more only oversubscribes shared
    CPUs (tens of seconds lost to thread contention in DenseNet121's many small operations).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
SPATIAL = {2: (8, 8), 3: (4, 6, 6)}


class ConvLinearNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU ("features") -> flatten -> ONE linear layer."""

    def __init__(self, dims: int, n_classes: int = 4, feat: int = 3):
        super().__init__()
        conv = CONV[dims]
        self.features = nn.Sequential(
            conv(1, 5, 3, padding=1),
            nn.ReLU(inplace=True),
            conv(5, feat, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        n = feat
        for s in SPATIAL[dims]:
            n *= s
        self.fc = nn.Linear(n, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class GapLinearNet(nn.Module):
    """The CAM architecture: conv features -> global average pooling -> linear."""

    def __init__(self, dims: int, n_classes: int = 4, feat: int = 6):
        super().__init__()
        conv = CONV[dims]
        self.features = nn.Sequential(conv(1, feat, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(feat, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.fc(f.flatten(2).mean(-1))


def make_input(dims: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, *SPATIAL[dims], generator=g)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dims(request: pytest.FixtureRequest) -> int:
    return request.param


def installed_console_script() -> Path | None:
    """The installed ``hirescam3d`` command (this interpreter's first), or None."""
    beside = Path(sys.executable).parent / "hirescam3d"
    if beside.exists():
        return beside
    found = shutil.which("hirescam3d")
    return Path(found) if found else None
