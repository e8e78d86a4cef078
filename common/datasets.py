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

``global_test_set`` is the test set one-shot FL papers report: the dataset's
test split in the domain of every participating client, balanced over classes
(the clients' held-out splits carry their label skew and favour a model trained
on their own data).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
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


# Images per class and domain of the global test set. 10 classes x 100 x 5 domains
# = 5,000 images of 16x16 for mnist-domains: one image is 0.1 points of a domain's
# accuracy; built and evaluated (small CNN) in about 0.6 s on a 2-core CPU. A
# constant, not a config key: every method and the centralized oracle see one set.
GLOBAL_TEST_PER_CLASS = 100

# Metric names of a client that measures its own model on the global test set
# (a method without a global model, e.g. ``local``): overall, and per domain as
# ``global-accuracy/<domain>``.
GLOBAL_METRIC = "global-accuracy"
GLOBAL_SIZE_METRIC = "global-test-examples"

NO_GLOBAL_TEST = (
    "the dataset has no test split outside the clients' data (an image folder holds "
    "only the clients' own files; a Hugging Face dataset needs a 'test' split)"
)


@dataclass(frozen=True)
class GlobalTestSet:
    """The dataset's test split rendered in (or taken from) every participating
    domain, balanced over classes: the test set one-shot FL papers report on.

    ``images`` ``[N, C, S, S]`` in ``[-1, 1]``, ``labels`` ``[N]``,
    ``domain_index`` ``[N]`` (positions in ``domains``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    domain_index: torch.Tensor
    domains: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def score(self, predictions: torch.Tensor) -> tuple[float, dict[str, float]]:
        """Accuracy of ``predictions`` (class ids ``[N]``): overall and per domain."""
        if tuple(predictions.shape) != tuple(self.labels.shape):
            raise ValueError(
                f"predictions have shape {tuple(predictions.shape)}, the global test "
                f"set has {len(self)} labels"
            )
        hit = (predictions.cpu() == self.labels).float()
        per_domain = {
            d: float(hit[self.domain_index == k].mean())
            for k, d in enumerate(self.domains)
            if bool((self.domain_index == k).any())
        }
        return float(hit.mean()), per_domain

    def metrics(self, predictions: torch.Tensor) -> dict[str, float]:
        """``score`` as a client's flat metrics (``GLOBAL_METRIC`` and per domain)."""
        overall, per_domain = self.score(predictions)
        return {
            GLOBAL_METRIC: overall,
            GLOBAL_SIZE_METRIC: float(len(self)),
            **{f"{GLOBAL_METRIC}/{d}": a for d, a in per_domain.items()},
        }


class DatasetSource(Protocol):
    """One kind of dataset in the registry."""

    kind: str

    def matches(self, name: str) -> bool: ...

    def info(self, args: DataArgs) -> DatasetInfo | None: ...

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData: ...

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]: ...

    def public_pairs(
        self, args: DataArgs, n: int
    ) -> tuple[torch.Tensor, list[str]] | None:
        """Public images with captions (never a client's), or None."""
        ...

    def global_test(
        self, args: DataArgs, domains: tuple[str, ...], per_class: int
    ) -> GlobalTestSet | None: ...


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
        return _dirichlet_indices(ds, num_partitions, alpha, seed, partition_id)
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


def _dirichlet_indices(
    ds: Any, num_partitions: int, alpha: float, seed: int, partition_id: int
) -> np.ndarray:
    """flwr-datasets' Dirichlet partition with at least 10 examples a partition;
    where 10 cannot be drawn (1,000 partitions of 30,000 images: the partitioner
    gives up after 10 attempts), at least 5, then 2 (a train and a test image).
    The same seed gives the same partitions at every size that worked before."""
    import warnings

    from flwr_datasets.partitioner import DirichletPartitioner

    for min_size in (10, 5, 2):
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
        part.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # one per retry
                return np.asarray(part.load_partition(partition_id)["idx"])
        except ValueError:
            if min_size == 2:
                raise ValueError(
                    f"partition='dirichlet' cannot give {num_partitions} partitions "
                    f"of {len(ds)} examples at least 2 examples each with "
                    f"dirichlet-alpha={alpha}; use fewer clients, a larger alpha, or "
                    "partition='iid'"
                ) from None
    raise AssertionError("unreachable")


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


def _balanced_ids(
    labels: np.ndarray, num_classes: int, per_class: int, seed: int
) -> np.ndarray:
    """``per_class`` ids of every class (all of a smaller class), drawn from
    ``seed``; sorted, so the set does not depend on the draw order."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        picks.append(rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _client_split(
    images: torch.Tensor,
    y: torch.Tensor,
    domain: str,
    info: DatasetInfo,
    args: DataArgs,
    partition_id: int,
) -> ClientData:
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

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]:
        """Partition ``p`` holds ``domains[p mod K]`` (as ``load`` assigns them)."""
        if args.dataset != "mnist-domains":
            return ("plain",)
        names = args.domains
        if args.partition == "domain":  # load's first-seen order of the pool
            names = tuple(dict.fromkeys(names))
        return tuple(
            dict.fromkeys(names[p % len(names)] for p in range(num_partitions))
        )

    def public_pairs(self, args: DataArgs, n: int) -> tuple[torch.Tensor, list[str]]:
        """The public half of MNIST (what the embedded stack was pretrained on) in
        its styles, with their templated captions."""
        styled = mnist_world.public_styled_set(args.image_size, seed=args.seed)
        g = np.random.default_rng(args.seed)
        idx = np.sort(
            g.choice(len(styled.labels), size=min(n, len(styled.labels)), replace=False)
        )
        caps = [
            mnist_world.caption(
                int(styled.labels[i]), styled.styles[i], int(i) % 4, int(i) % 2
            )
            for i in idx
        ]
        return styled.images[idx], caps

    def global_test(
        self, args: DataArgs, domains: tuple[str, ...], per_class: int
    ) -> GlobalTestSet:
        """The official MNIST test split (never seen by the stack nor the clients):
        ``per_class`` digits per class, the same ones rendered in every domain."""
        raw, labels = mnist_world.load_mnist("test")
        ids = _balanced_ids(labels, len(mnist_world.DIGIT_NAMES), per_class, args.seed)
        images = torch.cat(
            [
                mnist_world.render_style(raw[ids], d, args.image_size, seed=args.seed)
                for d in domains
            ]
        )
        y = torch.as_tensor(labels[ids])
        return GlobalTestSet(
            images,
            y.repeat(len(domains)),
            torch.arange(len(domains)).repeat_interleave(len(ids)),
            domains,
        )


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
    def _open(name: str, split: str = "train") -> Any:
        """The ``train`` split (or the first one, or the only dataset); another
        ``split``: that split, or ``None`` if the dataset has none."""
        import datasets

        ds = HuggingFaceSource._open_all(name)
        if not isinstance(ds, datasets.DatasetDict):
            return ds if split == "train" else None
        if split == "train":
            return ds["train"] if "train" in ds else ds[next(iter(ds))]
        return ds[split] if split in ds else None

    @staticmethod
    @functools.lru_cache(maxsize=2)
    def _open_all(name: str) -> Any:
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

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]:
        """Which partition holds which domain only the clients know: all of them."""
        return self.info(args).domains or ("plain",)

    def public_pairs(self, args: DataArgs, n: int) -> None:
        return None

    def global_test(
        self, args: DataArgs, domains: tuple[str, ...], per_class: int
    ) -> GlobalTestSet | None:
        """The ``test`` split, ``per_class`` images per class of every domain in
        ``domains`` (its ``domain`` column; ``plain`` without one); ``None``
        without a ``test`` split."""
        ds = self._open(args.dataset, "test")
        if ds is None:
            return None
        info = self.info(args)
        image, label = self._columns(args.dataset, ds)
        names = tuple(ds.features[label].names)
        if names != info.class_names:
            raise ValueError(
                f"dataset={args.dataset!r}: the test split's classes {names[:5]} "
                f"differ from the train split's {info.class_names[:5]}"
            )
        labels = np.asarray(ds[label], dtype=np.int64)
        doms = (
            np.asarray(ds["domain"])
            if "domain" in ds.column_names
            else np.full(len(labels), "plain")
        )
        xs, ys, ks = [], [], []
        for k, d in enumerate(domains):
            rows = np.flatnonzero(doms == d)
            ids = rows[
                _balanced_ids(labels[rows], info.num_classes, per_class, args.seed)
            ]
            xs += [
                _pil_to_tensor(im, info.channels, args.image_size)
                for im in ds.select(ids.tolist())[image]
            ]
            ys.append(torch.as_tensor(labels[ids]))
            ks.append(torch.full((len(ids),), k, dtype=torch.int64))
        if not xs:
            return None
        return GlobalTestSet(torch.stack(xs), torch.cat(ys), torch.cat(ks), domains)


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
            args.dataset,
            tuple(class_names),
            1,
            tuple(dict.fromkeys(all_domains.tolist()))
            if all_domains is not None
            else (),
        )
        return _client_split(images[idx], y[idx], domain, info, args, partition_id)

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]:
        return ()  # the server does not read the clients' folders

    def public_pairs(self, args: DataArgs, n: int) -> None:
        return None

    def global_test(
        self, args: DataArgs, domains: tuple[str, ...], per_class: int
    ) -> None:
        return None  # the clients' own files are all there is: no server test split


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


def known_domains(info: DatasetInfo | None) -> tuple[str, ...]:
    """The dataset's domains; one, ``plain``, for a dataset without domains."""
    return info.domains if info is not None and info.domains else ("plain",)


def participating_domains(
    info: DatasetInfo | None, reported: Iterable[Any]
) -> tuple[str, ...]:
    """The dataset's domains that some client reported, in the dataset's order.

    ``reported`` is client input (the replies' meta ``domain``): only values equal
    to a known domain count, so nothing a client writes reaches a file name or a
    renderer.
    """
    seen = {d for d in reported if isinstance(d, str)}
    return tuple(d for d in known_domains(info) if d in seen)


def federation_domains(args: DataArgs, num_partitions: int) -> tuple[str, ...]:
    """The domains the ``num_partitions`` partitions hold, as far as the dataset
    tells without their images (a client's view of the whole federation)."""
    return get_source(args.dataset).federation_domains(args, num_partitions)


def global_test_set(
    args: DataArgs, domains: Sequence[str], per_class: int = GLOBAL_TEST_PER_CLASS
) -> GlobalTestSet | None:
    """The dataset's test split in every domain of ``domains``, ``per_class``
    images per class and domain, drawn from ``args.seed``; ``None`` where the
    dataset has no test split the caller can read (``NO_GLOBAL_TEST``).

    MNIST: the same test digits in every domain, so domains compare directly.
    Cached: server and in-process clients share one copy (do not modify it).
    """
    # 1. Check inputs
    if per_class < 1:
        raise ValueError(f"per_class={per_class} must be >= 1")
    domains = tuple(domains)
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains!r}: give at least one domain, each once")
    return _global_test_set(args, domains, per_class)


@functools.lru_cache(maxsize=4)
def _global_test_set(
    args: DataArgs, domains: tuple[str, ...], per_class: int
) -> GlobalTestSet | None:
    src = get_source(args.dataset)
    info = src.info(args)
    if info is None:
        return None
    unknown = [d for d in domains if d not in known_domains(info)]
    if unknown:
        raise ValueError(
            f"domains {unknown} are not domains of dataset={args.dataset!r} "
            f"({', '.join(known_domains(info))})"
        )
    return src.global_test(args, domains, per_class)


def public_pairs(
    args: DataArgs, n: int = 2000
) -> tuple[torch.Tensor, list[str]] | None:
    """Up to ``n`` public (image, caption) pairs the server may use, or None."""
    return get_source(args.dataset).public_pairs(args, n)


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
