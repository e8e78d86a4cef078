"""A Hugging Face dataset: a local ``save_to_disk`` folder, or a hub id."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ClientData, DataArgs, DatasetInfo, GlobalTestSet, pil_to_tensor
from .partitions import balanced_ids, cap_examples, client_split, partition_indices


def column(ds: Any, name: str) -> np.ndarray:
    """Column ``name`` of a Hugging Face dataset as one array, read at once
    (``np.asarray(ds[name])`` reads datasets 4's lazy Column row by row); a
    writable copy, not a view of Arrow's read-only buffer."""
    return np.array(ds.with_format("arrow")[name])


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

    Parameters
    ----------
    local : bool
        Match a local ``save_to_disk`` folder (``True``) or a name that is no
        path on this machine, a hub id (``False``).
    """

    kind = "huggingface"

    def __init__(self, local: bool) -> None:
        self.local = local

    def matches(self, name: str) -> bool:
        """A ``save_to_disk`` folder (``local``), or a name that is no path."""
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
        """Classes (the ClassLabel's names), channels (the first image's mode) and
        domains (the ``domain`` column's values) of the ``train`` split."""
        ds = self._open(args.dataset)
        image, label = self._columns(args.dataset, ds)
        mode = ds[0][image].mode if len(ds) else "L"
        domains: tuple[str, ...] = ()
        if "domain" in ds.column_names:
            domains = tuple(dict.fromkeys(column(ds, "domain").tolist()))
        names = tuple(ds.features[label].names)
        return DatasetInfo(args.dataset, names, 1 if mode in ("L", "1") else 3, domains)

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        """A partition of the ``train`` split in the clients' image format."""
        ds = self._open(args.dataset)
        info = self.info(args)
        image, label = self._columns(args.dataset, ds)
        labels = column(ds, label).astype(np.int64)
        doms = column(ds, "domain") if info.domains else None
        idx = partition_indices(labels, doms, args, partition_id, num_partitions)
        idx = cap_examples(idx, args, partition_id)
        rows = ds.select(idx.tolist())[image]
        images = torch.stack(
            [pil_to_tensor(im, info.channels, args.image_size) for im in rows]
        )
        domain = str(doms[idx[0]]) if doms is not None and len(idx) else "plain"
        return client_split(
            images, torch.as_tensor(labels[idx]), domain, info, args, partition_id
        )

    def federation_domains(
        self, args: DataArgs, num_partitions: int
    ) -> tuple[str, ...]:
        """Which partition holds which domain only the clients know: all of them."""
        return self.info(args).domains or ("plain",)

    def public_pairs(self, args: DataArgs, n: int) -> None:
        """None: a Hugging Face dataset has no public captioned split here."""
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
        labels = column(ds, label).astype(np.int64)
        doms = (
            column(ds, "domain")
            if "domain" in ds.column_names
            else np.full(len(labels), "plain")
        )
        xs, ys, ks = [], [], []
        for k, d in enumerate(domains):
            rows = np.flatnonzero(doms == d)
            ids = rows[
                balanced_ids(labels[rows], info.num_classes, per_class, args.seed)
            ]
            xs += [
                pil_to_tensor(im, info.channels, args.image_size)
                for im in ds.select(ids.tolist())[image]
            ]
            ys.append(torch.as_tensor(labels[ids]))
            ks.append(torch.full((len(ids),), k, dtype=torch.int64))
        if not xs:
            return None
        return GlobalTestSet(torch.stack(xs), torch.cat(ys), torch.cat(ks), domains)
