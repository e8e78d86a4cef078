"""Client partitions: which examples a partition holds (flwr-datasets
partitioners, as Flower's examples use them), its train / held-out split, and
balanced draws of a test split."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch

from .base import ClientData, DataArgs, DatasetInfo


def partitioners() -> types.ModuleType:
    """``flwr_datasets.partitioner`` without flwr-datasets' plotting package.

    ``flwr_datasets/__init__.py`` imports ``flwr_datasets.visualization``, which
    imports seaborn and matplotlib (about 1.2 s and their memory in every
    ClientApp process, on an edge device for nothing: a client only partitions).
    While the package is first imported, a placeholder stands in for that one
    submodule and is removed afterwards, so a later ``import
    flwr_datasets.visualization`` gets the real one."""
    name = "flwr_datasets.visualization"
    if "flwr_datasets" in sys.modules:
        import flwr_datasets.partitioner as loaded

        return loaded
    stub = types.ModuleType(name)
    sys.modules[name] = stub
    try:
        import flwr_datasets
        import flwr_datasets.partitioner as fresh
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
        if getattr(sys.modules.get("flwr_datasets"), "visualization", None) is stub:
            del flwr_datasets.visualization
    return fresh


def partition_indices(
    labels: np.ndarray,
    domains: np.ndarray | None,
    args: DataArgs,
    partition_id: int,
    num_partitions: int,
) -> np.ndarray:
    """Indices of one partition, computed with flwr-datasets partitioners.

    Parameters
    ----------
    labels : np.ndarray
        Class id of every example of the pool ``[N]``.
    domains : np.ndarray or None
        Domain of every example ``[N]``; ``None`` for a dataset without domains
        (then ``partition="domain"`` is refused).
    args : DataArgs
        ``partition`` (iid, dirichlet, pathological, domain), ``alpha``,
        ``classes_per_client`` and ``seed``.
    partition_id, num_partitions : int
        Which partition of how many.
    """
    partition, alpha, seed = args.partition, args.alpha, args.seed
    classes_per_client = args.classes_per_client
    from datasets import Dataset

    fp = partitioners()
    IidPartitioner, PathologicalPartitioner = (
        fp.IidPartitioner,
        fp.PathologicalPartitioner,
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

    DirichletPartitioner = partitioners().DirichletPartitioner

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


def cap_examples(idx: np.ndarray, args: DataArgs, partition_id: int) -> np.ndarray:
    """At most ``args.max_examples`` of ``idx`` (0: all), drawn from the seed and
    the partition, in their original order."""
    if args.max_examples and len(idx) > args.max_examples:
        rng = np.random.default_rng(args.seed + 7919 * (partition_id + 1))
        idx = np.sort(rng.choice(idx, size=args.max_examples, replace=False))
    return idx


def balanced_ids(
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


def client_split(
    images: torch.Tensor,
    y: torch.Tensor,
    domain: str,
    info: DatasetInfo,
    args: DataArgs,
    partition_id: int,
) -> ClientData:
    """A partition's images and labels split into training and held-out parts
    (``args.test_fraction``, at least one held-out example)."""
    if len(y) < 2:
        raise ValueError(
            f"partition {partition_id} of dataset={args.dataset!r} has {len(y)} "
            "example(s); use fewer clients or another partition"
        )
    tr, te = _split_train_test(len(y), args.test_fraction, args.seed + partition_id)
    return ClientData(images[tr], y[tr], images[te], y[te], domain, info)
