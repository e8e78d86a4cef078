"""Classifiers trained by the server (and by clients in the fedavg/local baselines).

No torchvision here (it does not load beside the CPU torch build), so ResNet-18
(He et al. 2016) is written out; ``cnn`` is a small network for small images.
Both are saved as ``config.json`` + ``model.safetensors`` (``save_classifier``),
loaded with ``load_classifier``; ``classify`` turns image files into class names.

Input convention of every classifier here (the clients' data pipeline,
``common.datasets.pil_to_tensor``): float ``[N, C, S, S]`` with
``x = pixel / 127.5 - 1`` in ``[-1, 1]``; ``C = 1`` is grayscale (PIL mode ``L``),
``C = 3`` RGB; ``S`` is the run's ``image-size``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field
from torch import nn

ARCHS = ("cnn", "resnet18")


def arch_list(value: str) -> list[str]:
    """The architectures of a comma list (a method's ``*-client-classifiers``
    key), blanks dropped; ``ValueError`` naming any that is not in ``ARCHS``."""
    archs = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise ValueError(f"{bad} not in {', '.join(ARCHS)}")
    return archs


# A run-config value: the clients' classifiers by partition id modulo the list
# (empty: every client uses ``classifier``), checked once when the config is built.
ArchList = Annotated[
    str,
    AfterValidator(lambda v: (arch_list(v), v)[1]),
    Field(json_schema_extra={"allowed": f"comma list of {', '.join(ARCHS)}"}),
]

# Global models a method adds (``register_classifier``): arch -> builder
# ``(in_channels, num_classes) -> nn.Module``; e.g. ``zero-shot``
# (``methods/zero_shot``). Never a ``classifier`` value: nothing trains them.
EXTRA_ARCHS: dict[str, Callable[[int, int], nn.Module]] = {}


def register_classifier(arch: str, builder: Callable[[int, int], nn.Module]) -> None:
    """Let ``build_classifier`` (hence the round's evaluation, ``global_model/``
    and ``load_classifier``) build ``arch``; its state dict must say the rest."""
    if arch in ARCHS:
        raise ValueError(f"arch={arch!r} is built in; register another name")
    EXTRA_ARCHS[arch] = builder


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
        """Class logits ``[N, num_classes]``."""
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
        """Penultimate features ``[N, 512]`` (used by the FID-proxy)."""
        return self.pool(self.layers(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.embed(x))


def build_classifier(
    arch: str, in_channels: int, num_classes: int, width: int = 32
) -> nn.Module:
    """A classifier of architecture ``arch`` (one of ``ARCHS``, or of
    ``EXTRA_ARCHS``: built empty, its ``load_state_dict`` sizes it).

    Parameters
    ----------
    arch : str
        ``cnn`` (``SmallCNN``), ``resnet18`` or a registered one.
    in_channels, num_classes : int
        Image channels and classes.
    width : int
        Channels of the CNN's first layer (the ResNet ignores it).
    """
    if arch == "cnn":
        return SmallCNN(in_channels, num_classes, width)
    if arch == "resnet18":
        return ResNet18(in_channels, num_classes)
    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch](in_channels, num_classes)
    raise ValueError(
        f"classifier={arch!r} is not one of {', '.join((*ARCHS, *EXTRA_ARCHS))} "
        "(a method's own architecture is known once `methods` is imported)"
    )


def classifier_from_state(
    arch: str, state: Mapping[str, torch.Tensor], in_channels: int, num_classes: int
) -> nn.Module:
    """A classifier of architecture ``arch`` (``build_classifier``) holding the
    weights ``state``, loaded strictly (a missing or extra key raises)."""
    model = build_classifier(arch, in_channels, num_classes)
    model.load_state_dict(state)
    return model


def input_spec(in_channels: int) -> dict[str, Any]:
    """What a classifier with ``in_channels`` takes (``config.json``'s
    ``normalization``): the clients' tensors, as ``common.datasets`` makes them."""
    grey = in_channels == 1
    return {
        "tensor": "float32 [N, in_channels, image_size, image_size] (NCHW)",
        "pil_mode": "L" if grey else "RGB",
        "color": "grayscale, 1 channel" if grey else "RGB, 3 channels",
        "resize": "PIL Image.resize((image_size, image_size)), Pillow's default "
        "filter (bicubic), as image-folder and Hugging Face clients load images; "
        "MNIST clients render 28 px digits down with antialiased bilinear "
        "(common.mnist_domains.render_style); an image of image_size px is used as is",
        "range": [-1.0, 1.0],
        "formula": "x = pixel / 127.5 - 1 (pixel: uint8 in 0..255)",
        "output": "logits [N, num_classes]; argmax indexes class_names",
    }


# config.json keys the architecture needs; ``extra`` may not override them
_CORE_KEYS = (
    "arch",
    "in_channels",
    "num_classes",
    "width",
    "class_names",
    "image_size",
    "normalization",
)


def save_classifier(
    model: nn.Module,
    path: str | Path,
    arch: str,
    in_channels: int,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` to the folder ``path``.

    ``config.json`` holds what ``load_classifier`` needs (``arch``,
    ``in_channels``, ``num_classes``, ``width``), the input convention
    (``normalization``, see ``input_spec``) and, when given, ``class_names``
    (position = class id) and ``image_size`` (both needed by ``classify``), and
    ``extra`` (e.g. ``method``, ``dataset``, ``global_accuracy``).
    """
    from safetensors.torch import save_file

    # 1. Check inputs
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names, num_classes={num_classes}; "
            "give one name per class"
        )
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1")
    clash = sorted(set(extra or {}) & set(_CORE_KEYS))
    if clash:
        raise ValueError(f"extra may not set {clash}; pass them as arguments")

    # 2. Write
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "arch": arch,
        "in_channels": in_channels,
        "num_classes": num_classes,
    }
    if isinstance(model, SmallCNN):
        cfg["width"] = model.width
    if class_names is not None:
        cfg["class_names"] = [str(c) for c in class_names]
    if image_size is not None:
        cfg["image_size"] = int(image_size)
    cfg["normalization"] = input_spec(in_channels)
    cfg |= extra or {}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))


def classifier_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a classifier folder (checked to describe one)."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no classifier at {path} (config.json missing)")
    cfg = json.loads(file.read_text())
    if not isinstance(cfg, dict) or "arch" not in cfg:
        hint = (
            f"; this folder holds a LoRA adapter, its classifier is in {path / 'classifier'}"
            if (path / "classifier" / "config.json").is_file()
            else ""
        )
        raise ValueError(f"{file} describes no classifier (no 'arch' key){hint}")
    return cfg


def load_classifier(path: str | Path) -> nn.Module:
    """The classifier saved by ``save_classifier`` in the folder ``path``, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = classifier_config(path)
    model = build_classifier(
        cfg["arch"], cfg["in_channels"], cfg["num_classes"], cfg.get("width", 32)
    )
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def classify(
    model_dir: str | Path,
    images: Sequence[Any],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Class names of ``images`` by the classifier saved in ``model_dir``.

    One call from image files to names, e.g. with a run's global model::

        from common.models import classify
        classify("out/my-run/global_model", ["a.png", "b.png"])  # ["seven", "one"]

    Each image goes through the clients' data pipeline
    (``common.datasets.pil_to_tensor``): converted to grayscale or RGB as the
    classifier's ``in_channels`` say, resized to its ``image_size`` (PIL, default
    filter), ``x = pixel / 127.5 - 1``.

    Parameters
    ----------
    model_dir : str or Path
        A folder written by ``save_classifier`` with ``class_names`` and
        ``image_size`` (every run's ``global_model/``; a LoRA run's
        ``global_model/classifier/``).
    images : sequence of PIL.Image.Image, str or Path
        Images, or paths of image files.
    batch_size : int
        Images per forward pass.
    device : torch.device or str
        Where the classifier runs.

    Returns
    -------
    list of str
        One class name per image, in order.
    """
    from PIL import Image

    from .datasets import pil_to_tensor
    from .train import predict

    # 1. Check inputs
    cfg = classifier_config(model_dir)
    missing = [k for k in ("class_names", "image_size") if k not in cfg]
    if missing:
        raise ValueError(
            f"{Path(model_dir) / 'config.json'} has no {missing}; save the classifier "
            "with save_classifier(..., class_names=..., image_size=...)"
        )
    if isinstance(images, (str, Path, Image.Image)):
        raise TypeError(
            f"images is one {type(images).__name__}; pass a list of images or paths"
        )
    names, size = list(cfg["class_names"]), int(cfg["image_size"])
    channels = int(cfg["in_channels"])

    # 2. Images -> the clients' tensors
    xs = []
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            with Image.open(im) as f:
                xs.append(pil_to_tensor(f, channels, size))
        elif isinstance(im, Image.Image):
            xs.append(pil_to_tensor(im, channels, size))
        else:
            raise TypeError(
                f"images[{i}] is a {type(im).__name__}; give a PIL image or a path"
            )
    if not xs:
        return []

    # 3. Predict
    model = load_classifier(model_dir)
    ids = predict(model, torch.stack(xs), batch_size=batch_size, device=device)
    return [names[int(k)] for k in ids]
