"""Datasets behind a registry: each returns one ``DatasetInfo`` and loads a client's
partition.

A ``dataset`` value is resolved in this order:

* ``mnist-domains``: the clients' half of MNIST (``common.data``), client ``i``
  rendered in ``domains[i mod K]``; ``mnist``: the same, plain;
* a local Hugging Face dataset folder (written by ``Dataset.save_to_disk``);
* a local image folder (``<class>/<image>`` or ``<domain>/<class>/<image>``);
* anything else is a Hugging Face hub id (``datasets.load_dataset``).

Partitions are computed with flwr-datasets partitioners, as Flower's examples do.
The server learns the classes from ``dataset_info`` where the dataset can say
without reading a client's images (MNIST, a Hugging Face schema); for an image
folder (the clients' own files) it returns ``None`` and the server takes a vote
over the replies that passed validation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import data as mnist_world


@dataclass(frozen=True)
class DatasetInfo:
    """What server and clients know of a dataset without looking at the images."""

    name: str
    class_names: tuple[str, ...]
    channels: int = 1
    domains: tuple[str, ...] = ()
    # MNIST's digits have their own prompt templates and phrase bank
    digits: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_prompt(self, label: int) -> str:
        """The FGL-style prompt built from a class name alone."""
        if self.digits:
            return mnist_world.class_name_prompt(label)
        return f"a photo of a {self.class_names[label]}"

    def phrase_bank(self) -> tuple[list[str], np.ndarray]:
        """Captions that retrieval captioning ranks: ``(texts, class ids)``."""
        if self.digits:
            texts, labels, _ = mnist_world.phrase_bank(self.num_classes)
            return texts, labels
        texts = [self.class_prompt(c) for c in range(self.num_classes)]
        return texts, np.arange(self.num_classes, dtype=np.int64)

    def oracle_caption(self, label: int, domain: str) -> str:
        """The exact caption of an image (the reference captioning is measured to)."""
        if self.digits:
            return mnist_world.caption(label, domain)
        return self.class_prompt(label)


@dataclass
class ClientData:
    """One client's private data: a training part and a held-out part of its domain."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    domain: str
    info: DatasetInfo = field(
        default_factory=lambda: DatasetInfo(
            "mnist", mnist_world.DIGIT_NAMES, digits=True
        )
    )

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])


@dataclass(frozen=True)
class DataArgs:
    """The run-config keys that shape a client's partition."""

    dataset: str
    partition: str = "dirichlet"
    image_size: int = 16
    alpha: float = 0.5
    classes_per_client: int = 2
    domains: tuple[str, ...] = mnist_world.DEFAULT_CLIENT_DOMAINS
    max_examples: int = 0
    test_fraction: float = 0.2
    seed: int = 0


class DatasetSource(Protocol):
    """One kind of dataset in the registry."""

    kind: str

    def matches(self, name: str) -> bool: ...

    def info(self, args: DataArgs) -> DatasetInfo | None: ...

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData: ...


# ------------------------------------------------------------------ partitions


def _partition_indices(
    labels: np.ndarray,
    domains: np.ndarray | None,
    args: DataArgs,
    partition_id: int,
    num_partitions: int,
) -> np.ndarray:
    """Indices of one partition, computed with flwr-datasets partitioners."""
    partition, alpha, seed = args.partition, args.alpha, args.seed
    classes_per_client = args.classes_per_client
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    ds = Dataset.from_dict({"label": labels.tolist(), "idx": list(range(len(labels)))})
    if partition == "domain":
        if domains is None:
            raise ValueError(
                "partition='domain' needs a dataset with domains (mnist-domains, or an "
                "image folder laid out as <domain>/<class>/<image>)"
            )
        names = list(dict.fromkeys(domains.tolist()))  # first-seen order
        mine = names[partition_id % len(names)]
        sharing = [p for p in range(num_partitions) if names[p % len(names)] == mine]
        sub = ds.select(np.flatnonzero(domains == mine).tolist())
        part = IidPartitioner(num_partitions=len(sharing))
        part.dataset = sub
        return np.asarray(part.load_partition(sharing.index(partition_id))["idx"])
    if partition == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partition == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=10,
            self_balancing=True,
            seed=seed,
        )
    elif partition == "pathological":
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        raise ValueError(
            f"partition={partition!r} is not one of iid, dirichlet, pathological, domain"
        )
    part.dataset = ds
    return np.asarray(part.load_partition(partition_id)["idx"])


def _split_train_test(
    n: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _cap(idx: np.ndarray, args: DataArgs, partition_id: int) -> np.ndarray:
    if args.max_examples and len(idx) > args.max_examples:
        rng = np.random.default_rng(args.seed + 7919 * (partition_id + 1))
        idx = np.sort(rng.choice(idx, size=args.max_examples, replace=False))
    return idx


def _client_split(
    images: torch.Tensor, y: torch.Tensor, domain: str, info: DatasetInfo,
    args: DataArgs, partition_id: int,
) -> ClientData:  # fmt: skip
    if len(y) < 2:
        raise ValueError(
            f"partition {partition_id} of dataset={args.dataset!r} has {len(y)} "
            "example(s); use fewer clients or another partition"
        )
    tr, te = _split_train_test(len(y), args.test_fraction, args.seed + partition_id)
    return ClientData(images[tr], y[tr], images[te], y[te], domain, info)


class MnistSource:
    """The clients' half of MNIST, in the styles of ``domains`` or plain."""

    kind = "mnist"

    def matches(self, name: str) -> bool:
        return name in ("mnist-domains", "mnist")

    def info(self, args: DataArgs) -> DatasetInfo:
        domains = args.domains if args.dataset == "mnist-domains" else ("plain",)
        return DatasetInfo(args.dataset, mnist_world.DIGIT_NAMES, 1, domains, True)

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        raw, labels = mnist_world.mnist_client_pool()
        styled = args.dataset == "mnist-domains"
        pool_domains = (
            np.asarray(
                [args.domains[j % len(args.domains)] for j in range(len(labels))]
            )
            if styled
            else None
        )
        idx = _partition_indices(
            labels, pool_domains, args, partition_id, num_partitions
        )
        if not styled:
            domain = "plain"
        elif args.partition == "domain" and pool_domains is not None:
            domain = str(pool_domains[idx[0]])
        else:
            domain = args.domains[partition_id % len(args.domains)]
        idx = _cap(idx, args, partition_id)
        images = mnist_world.render_style(
            raw[idx], domain, args.image_size, seed=args.seed + partition_id
        )
        y = torch.as_tensor(labels[idx])
        return _client_split(images, y, domain, self.info(args), args, partition_id)


def _is_hf_folder(path: Path) -> bool:
    return any(
        (path / f).is_file()
        for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


class HuggingFaceSource:
    """A Hugging Face dataset: a ``save_to_disk`` folder, or a hub id.

    The first ``Image`` column holds the images and the first ``ClassLabel``
    column the labels (its names are the class names); an optional ``domain``
    column enables ``partition="domain"``. The ``train`` split is used.
    """

    kind = "huggingface"

    def __init__(self, local: bool) -> None:
        self.local = local

    def matches(self, name: str) -> bool:
        path = Path(name).expanduser()
        if self.local:
            return path.is_dir() and _is_hf_folder(path)
        return not path.exists()

    @staticmethod
    @functools.lru_cache(maxsize=2)
    def _open(name: str) -> Any:
        import datasets

        path = Path(name).expanduser()
        try:
            ds = (
                datasets.load_from_disk(str(path))
                if path.exists()
                else datasets.load_dataset(name)
            )
        except Exception as e:
            raise FileNotFoundError(
                f"dataset={name!r}: not 'mnist-domains', 'mnist', an image folder, "
                "nor a Hugging Face dataset this machine can open (a save_to_disk "
                f"folder or a hub id: {e.__class__.__name__}: {e})"
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        return ds

    @staticmethod
    def _columns(name: str, ds: Any) -> tuple[str, str]:
        import datasets

        feats = ds.features
        image = next(
            (k for k, f in feats.items() if isinstance(f, datasets.Image)), None
        )
        label = next(
            (k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None
        )
        if image is None or label is None:
            raise ValueError(
                f"dataset={name!r} needs an Image column and a ClassLabel column; "
                f"it has {dict(feats)}"
            )
        return image, label

    def info(self, args: DataArgs) -> DatasetInfo:
        ds = self._open(args.dataset)
        image, label = self._columns(args.dataset, ds)
        mode = ds[0][image].mode if len(ds) else "L"
        domains: tuple[str, ...] = ()
        if "domain" in ds.column_names:
            domains = tuple(dict.fromkeys(ds["domain"]))
        names = tuple(ds.features[label].names)
        return DatasetInfo(args.dataset, names, 1 if mode in ("L", "1") else 3, domains)

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        ds = self._open(args.dataset)
        info = self.info(args)
        image, label = self._columns(args.dataset, ds)
        labels = np.asarray(ds[label], dtype=np.int64)
        doms = np.asarray(ds["domain"]) if info.domains else None
        idx = _partition_indices(labels, doms, args, partition_id, num_partitions)
        idx = _cap(idx, args, partition_id)
        rows = ds.select(idx.tolist())[image]
        images = torch.stack(
            [_pil_to_tensor(im, info.channels, args.image_size) for im in rows]
        )
        domain = str(doms[idx[0]]) if doms is not None and len(idx) else "plain"
        return _client_split(
            images, torch.as_tensor(labels[idx]), domain, info, args, partition_id
        )


def _pil_to_tensor(im: Any, channels: int, size: int) -> torch.Tensor:
    im = im.convert("L" if channels == 1 else "RGB").resize((size, size))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    t = torch.as_tensor(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


class ImageFolderSource:
    """``<class>/<image>`` or ``<domain>/<class>/<image>``: the clients' own files.

    ``info`` is ``None``: the server does not read the clients' folders; it learns
    the classes from a vote over validated replies.
    """

    kind = "imagefolder"

    def matches(self, name: str) -> bool:
        return Path(name).expanduser().is_dir()

    def info(self, args: DataArgs) -> None:
        return None

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        images, y, class_names, all_domains = _load_image_folder(
            args.dataset, args.image_size
        )
        idx = _partition_indices(
            y.numpy(), all_domains, args, partition_id, num_partitions
        )
        idx = _cap(idx, args, partition_id)
        domain = str(all_domains[idx[0]]) if all_domains is not None else "plain"
        info = DatasetInfo(
            args.dataset, tuple(class_names), 1,
            tuple(dict.fromkeys(all_domains.tolist())) if all_domains is not None else (),
        )  # fmt: skip
        return _client_split(images[idx], y[idx], domain, info, args, partition_id)


# The registry: the first source that matches a ``dataset`` value loads it.
DATASETS: tuple[DatasetSource, ...] = (
    MnistSource(),
    HuggingFaceSource(local=True),
    ImageFolderSource(),
    HuggingFaceSource(local=False),
)


def get_source(name: str) -> DatasetSource:
    for src in DATASETS:
        if src.matches(name):
            return src
    raise ValueError(f"dataset={name!r}: no dataset source matches")  # unreachable


def dataset_info(args: DataArgs) -> DatasetInfo | None:
    """What the server may know without the clients (``None``: ask them)."""
    return get_source(args.dataset).info(args)


def load_client_data(
    dataset: str,
    partition: str,
    partition_id: int,
    num_partitions: int,
    **kwargs: Any,
) -> ClientData:
    """Load one client's partition of ``dataset`` with a held-out split.

    ``kwargs`` are the fields of ``DataArgs`` (``image_size``, ``alpha``, ...).
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id} must be in [0, num-partitions={num_partitions})"
        )
    args = DataArgs(dataset, partition, **kwargs)
    return get_source(dataset).load(args, partition_id, num_partitions)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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
