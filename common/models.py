"""Classifiers trained by the server (and by clients in the fedavg/local baselines).

No torchvision here (it does not load beside the CPU torch build), so ResNet-18
(He et al. 2016) is written out; ``cnn`` is a small network for small images.
Both are saved as ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ARCHS = ("cnn", "resnet18")


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; for 16-32 px images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.width = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used by the FID-proxy)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016, arXiv 1512.03385), CIFAR-style 3x3 stem."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_classifier(
    arch: str, in_channels: int, num_classes: int, width: int = 32
) -> nn.Module:
    if arch == "cnn":
        return SmallCNN(in_channels, num_classes, width)
    if arch == "resnet18":
        return ResNet18(in_channels, num_classes)
    raise ValueError(f"classifier={arch!r} is not one of {', '.join(ARCHS)}")


def save_classifier(
    model: nn.Module, path: str | Path, arch: str, in_channels: int, num_classes: int
) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"arch": arch, "in_channels": in_channels, "num_classes": num_classes}
    if isinstance(model, SmallCNN):
        cfg["width"] = model.width
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def load_classifier(path: str | Path) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no classifier at {path} (config.json missing)")
    cfg = json.loads((path / "config.json").read_text())
    model = build_classifier(
        cfg["arch"], cfg["in_channels"], cfg["num_classes"], cfg.get("width", 32)
    )
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()
