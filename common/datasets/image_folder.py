"""A local image folder: ``<class>/<image>`` or ``<domain>/<class>/<image>``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .base import ClientData, DataArgs, DatasetInfo
from .partitions import cap_examples, client_split, partition_indices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageFolderSource:
    """``<class>/<image>`` or ``<domain>/<class>/<image>``: the clients' own files.

    ``info`` is ``None``: the server does not read the clients' folders; it learns
    the classes from a vote over validated replies.
    """

    kind = "imagefolder"

    def matches(self, name: str) -> bool:
        """An existing folder."""
        return Path(name).expanduser().is_dir()

    def info(self, args: DataArgs) -> None:
        """None: the server learns the classes from the clients' replies."""
        return None

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        """A partition of the folder's images, as grey images."""
        images, y, class_names, all_domains = _load_image_folder(
            args.dataset, args.image_size
        )
        idx = partition_indices(
            y.numpy(), all_domains, args, partition_id, num_partitions
        )
        idx = cap_examples(idx, args, partition_id)
        domain = str(all_domains[idx[0]]) if all_domains is not None else "plain"
        info = DatasetInfo(
            args.dataset,
            tuple(class_names),
            1,
            tuple(dict.fromkeys(all_domains.tolist()))
            if all_domains is not None
            else (),
        )
        return client_split(images[idx], y[idx], domain, info, args, partition_id)

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]:
        """None known: the server does not read the clients' folders."""
        return ()  # the server does not read the clients' folders

    def public_pairs(self, args: DataArgs, n: int) -> None:
        """None: the folder holds only the clients' own files."""
        return None

    def global_test(
        self, args: DataArgs, domains: tuple[str, ...], per_class: int
    ) -> None:
        """None: the clients' own files are all there is, no server test split."""
        return None  # the clients' own files are all there is: no server test split


@functools.lru_cache(maxsize=2)
def _load_image_folder(
    root: str, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str], np.ndarray | None]:
    """Read ``<class>/<img>`` or ``<domain>/<class>/<img>`` as grey images."""
    from PIL import Image

    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset={root!r} is neither 'mnist-domains', 'mnist' nor an existing "
            "image folder (<class>/<image> or <domain>/<class>/<image>)"
        )
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    nested = bool(subdirs) and all(
        any(q.is_dir() for q in d.iterdir()) for d in subdirs
    )
    groups = [(d.name, d) for d in subdirs] if nested else [("plain", path)]
    class_names = sorted({c.name for _, g in groups for c in g.iterdir() if c.is_dir()})
    if not class_names:
        raise FileNotFoundError(f"dataset={root!r}: no class subfolders found")
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    doms: list[str] = []
    for dom, g in groups:
        for ci, cname in enumerate(class_names):
            cdir = g / cname
            if not cdir.is_dir():
                continue
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                im = Image.open(f).convert("L").resize((image_size, image_size))
                arr = torch.as_tensor(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
                xs.append(arr[None])
                ys.append(ci)
                doms.append(dom)
    if not xs:
        raise FileNotFoundError(
            f"dataset={root!r}: no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    images = torch.stack(xs)
    domains = np.asarray(doms) if nested else None
    return images, torch.as_tensor(ys), class_names, domains
