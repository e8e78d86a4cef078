"""Client partitions: which examples a partition holds (flwr-datasets
partitioners, as Flower's examples use them), its train / held-out split, and
balanced draws of a test split."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from .base import ClientData, DataArgs, DatasetInfo, Partition


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


PARTITIONS: tuple[str, ...] = get_args(Partition)

# The partitionings this process computed last, by what they depend on. A
# simulation worker or an in-process run loads many clients of one federation
# (and each client twice: collect, then evaluate); flwr-datasets computes every
# partition of a partitioning at once, so the others are then free.
_CACHE: OrderedDict[tuple, Callable[[int], np.ndarray]] = OrderedDict()
_CACHE_SIZE = 4
_LOCK = threading.Lock()


def partition_indices(
    labels: np.ndarray,
    domains: np.ndarray | None,
    args: DataArgs,
    partition_id: int,
    num_partitions: int,
) -> np.ndarray:
    """Indices of one partition, computed with flwr-datasets partitioners.

    The partitioning is computed once per process for the same pool, settings
    and number of partitions (the last few are kept), so loading the next
    client of the same federation costs a lookup.

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
    if args.partition not in PARTITIONS:
        raise ValueError(
            f"partition={args.partition!r} is not one of {', '.join(PARTITIONS)}"
        )
    if args.partition == "domain" and domains is None:
        raise ValueError(
            "partition='domain' needs a dataset with domains (mnist-domains, or an "
            "image folder laid out as <domain>/<class>/<image>)"
        )
    key = (
        _digest(labels),
        None if domains is None else _digest(domains),
        args.partition,
        args.alpha,
        args.classes_per_client,
        args.seed,
        num_partitions,
    )
    with _LOCK:
        split = _CACHE.pop(key, None)
        if split is None:
            kept = _read_kept(key, partition_id, len(labels))
            if kept is not None:  # another process of this device computed it
                return kept
            split = _partitioning(labels, domains, args, num_partitions)
        _CACHE[key] = split
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        idx = split(partition_id)
        _keep(key, partition_id, idx)
        return idx.copy()


# A partition's indices are also kept on disk, by what they depend on (the
# in-memory key, the partitioners' versions and this layout's version): Flower
# starts a fresh ClientApp process for every message, and a device answers
# several per round (the class query, the upload, the evaluation). The first
# computes its partition; the others read it back with numpy, without importing
# datasets and flwr-datasets (about 1 s of a 2-core CPU each) or partitioning
# again. ONESHOT_PARTITION_CACHE names the folder ("off": none); default
# $XDG_CACHE_HOME/oneshot-fl/partitions (~/.cache/...). A file that cannot be
# read, or holds no plausible partition, is removed and recomputed; one that
# cannot be written is skipped.
_KEPT_LAYOUT = 1
_KEPT_HERE: set[tuple] = set()  # (key, partition id) this process has kept


def _kept_dir() -> Path | None:
    where = os.environ.get("ONESHOT_PARTITION_CACHE", "")
    if where.lower() == "off":
        return None
    if where:
        return Path(where)
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home) / "oneshot-fl" / "partitions"


@functools.cache
def _partitioner_versions() -> tuple[str, str]:
    """flwr-datasets' and datasets' versions (read once: package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr-datasets"), version("datasets")
    except PackageNotFoundError:
        return "?", "?"


def _kept_path(key: tuple, partition_id: int) -> Path | None:
    root = _kept_dir()
    if root is None:
        return None
    libs = _partitioner_versions()
    h = hashlib.blake2b(repr((_KEPT_LAYOUT, libs, key)).encode(), digest_size=16)
    return root / h.hexdigest() / f"{partition_id}.npy"


def _read_kept(key: tuple, partition_id: int, pool: int) -> np.ndarray | None:
    """The kept indices of a partition, if a readable, plausible file holds
    them (int64, 1-D, distinct, within the pool of ``pool`` examples)."""
    path = _kept_path(key, partition_id)
    if path is None or not path.is_file():
        return None
    try:
        idx = np.load(path, allow_pickle=False)
        ok = (
            idx.dtype == np.int64
            and idx.ndim == 1
            and (len(idx) == 0 or (idx.min() >= 0 and idx.max() < pool))
            and len(np.unique(idx)) == len(idx)
        )
    except (OSError, ValueError):
        ok = False
    if not ok:  # recomputed, and written again by _keep
        path.unlink(missing_ok=True)
        return None
    return idx


def _keep(key: tuple, partition_id: int, idx: np.ndarray) -> None:
    """Write the indices for the next process (atomically; best effort), once
    per process and partition: a kept partitioning serves its clients from
    memory without touching the disk again."""
    if (key, partition_id) in _KEPT_HERE:
        return
    path = _kept_path(key, partition_id)
    if path is None:
        return
    _KEPT_HERE.add((key, partition_id))
    if path.is_file():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
        np.save(tmp, np.ascontiguousarray(idx, dtype=np.int64), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass


def _digest(a: np.ndarray) -> str:
    """What an array holds (dtype, shape and values), in 32 hex digits."""
    a = np.ascontiguousarray(a.astype(str) if a.dtype == object else a)
    h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
    h.update(a.tobytes())
    return h.hexdigest()


def _partitioning(
    labels: np.ndarray,
    domains: np.ndarray | None,
    args: DataArgs,
    num_partitions: int,
) -> Callable[[int], np.ndarray]:
    """``partition_id -> indices`` of one partitioning of the pool."""
    from datasets import Dataset

    fp = partitioners()
    # Arrow format: with datasets 4, ``ds["label"]`` of an unformatted dataset is
    # a lazy Column that ``np.asarray`` (as the partitioners call it) reads one
    # row at a time, about 1 s for 40,000 labels; an Arrow column is read at once.
    ds = Dataset.from_dict(
        {"label": labels.tolist(), "idx": list(range(len(labels)))}
    ).with_format("arrow")
    if args.partition == "domain":
        assert domains is not None
        names = list(dict.fromkeys(domains.tolist()))  # first-seen order
        per_domain: dict[str, Any] = {}

        def by_domain(partition_id: int) -> np.ndarray:
            mine = names[partition_id % len(names)]
            sharing = [
                p for p in range(num_partitions) if names[p % len(names)] == mine
            ]
            if mine not in per_domain:
                part = fp.IidPartitioner(num_partitions=len(sharing))
                part.dataset = ds.select(np.flatnonzero(domains == mine).tolist())
                per_domain[mine] = part
            return _ids(per_domain[mine].load_partition(sharing.index(partition_id)))

        return _memo(by_domain)
    if args.partition == "dirichlet":
        part = _dirichlet(ds, num_partitions, args.alpha, args.seed)
    else:
        if args.partition == "iid":
            part = fp.IidPartitioner(num_partitions=num_partitions)
        else:
            part = fp.PathologicalPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                num_classes_per_partition=args.classes_per_client,
                class_assignment_mode="first-deterministic",
                seed=args.seed,
            )
        part.dataset = ds
    return _memo(lambda partition_id: _ids(part.load_partition(partition_id)))


def _memo(load: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    """``load`` that keeps what it returned per partition id (a client's data is
    loaded for its upload and again for its evaluation; selecting a partition
    of a Hugging Face dataset costs ~50 ms, mostly hashing its indices)."""
    done: dict[int, np.ndarray] = {}

    def load_once(partition_id: int) -> np.ndarray:
        if partition_id not in done:
            done[partition_id] = load(partition_id)
        return done[partition_id]

    return load_once


def _ids(part: Any) -> np.ndarray:
    """The ``idx`` column of a partition (an Arrow-formatted dataset)."""
    return np.asarray(part["idx"], dtype=np.int64)


def _dirichlet(ds: Any, num_partitions: int, alpha: float, seed: int) -> Any:
    """flwr-datasets' Dirichlet partitioner with at least 10 examples a
    partition; where 10 cannot be drawn (1,000 partitions of 30,000 images: the
    partitioner gives up after 10 attempts), at least 5, then 2 (a train and a
    test image). The same seed gives the same partitions at every size that
    worked before. Returned with its partitions computed."""
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
                part.load_partition(0)  # computes every partition, or raises
            return part
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
