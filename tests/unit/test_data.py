import numpy as np
import pytest
import torch

from common.datasets import load_client_data
from common.mnist_domains import (
    ALL_STYLES,
    MNIST_PUBLIC_SIZE,
    UNSEEN_STYLES,
    load_mnist,
    mnist_client_pool,
    render_style,
    seen_in_pretraining,
)


def test_mnist_ships_in_the_package():
    x, y = load_mnist("train")
    assert x.shape == (60_000, 28, 28) and x.dtype == np.uint8
    assert sorted(np.unique(y).tolist()) == list(range(10))
    xt, _ = load_mnist("test")
    assert len(xt) == 10_000


def test_client_pool_is_disjoint_from_the_public_split():
    x, _ = load_mnist("train")
    pool, _ = mnist_client_pool()
    assert len(pool) == 60_000 - MNIST_PUBLIC_SIZE
    assert np.array_equal(pool[0], x[MNIST_PUBLIC_SIZE])


@pytest.mark.parametrize("style", ALL_STYLES)
def test_styles_render_in_range_and_deterministic(style):
    x, _ = load_mnist("test")
    a = render_style(x[:8], style, 16, seed=3)
    b = render_style(x[:8], style, 16, seed=3)
    assert a.shape == (8, 1, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    if style != "plain":
        assert not torch.allclose(a, render_style(x[:8], "plain", 16))


def test_inverted_is_the_negative():
    x, _ = load_mnist("test")
    assert torch.allclose(
        render_style(x[:4], "inverted", 28), -render_style(x[:4], "plain", 28)
    )


def test_dirichlet_partitions_are_disjoint_and_skewed():
    parts = [
        load_client_data("mnist-domains", "dirichlet", i, 4, alpha=0.3)
        for i in range(4)
    ]
    assert [p.domain for p in parts] == ["inverted", "thick", "thin", "rotated"]
    sizes = sum(len(p.train_labels) + len(p.test_labels) for p in parts)
    assert sizes == 60_000 - MNIST_PUBLIC_SIZE
    hist = torch.stack(
        [torch.bincount(p.train_labels, minlength=10) for p in parts]
    ).float()
    share = hist / hist.sum(1, keepdim=True)
    assert share.max() > 0.25  # label skew: some class dominates some client


def test_pathological_and_domain_partitions():
    p = load_client_data("mnist", "pathological", 0, 5, classes_per_client=2)
    assert len(torch.unique(torch.cat([p.train_labels, p.test_labels]))) == 2
    d = load_client_data("mnist-domains", "domain", 1, 5, max_examples=300)
    assert d.domain == "thick" and len(d.train_labels) + len(d.test_labels) == 300


def test_image_folder_with_domains(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for dom in ("photo", "sketch"):
        for cls in ("cat", "dog"):
            (tmp_path / dom / cls).mkdir(parents=True)
            for i in range(6):
                arr = rng.integers(0, 255, (20, 20), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / dom / cls / f"{i}.png")
    c = load_client_data(str(tmp_path), "domain", 1, 2, image_size=16)
    assert c.domain == "sketch" and c.class_names == ["cat", "dog"]
    assert c.train_images.shape[1:] == (1, 16, 16)
    assert len(c.train_labels) + len(c.test_labels) == 12


def test_bad_dataset_and_partition_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset="):
        load_client_data(str(tmp_path / "nope"), "iid", 0, 2)
    with pytest.raises(ValueError, match="partition-id=5"):
        load_client_data("mnist", "iid", 5, 2)


# ---------------------------------------------------------------- unseen transforms


def test_unseen_transforms_by_hand():
    x, _ = load_mnist("test")
    plain = render_style(x[:4], "plain", 28)
    assert torch.equal(render_style(x[:4], "plain+mirrored", 28), plain.flip(-1))
    assert torch.equal(render_style(x[:4], "plain+upside-down", 28), plain.flip(-2))
    boxed = render_style(x[:4], "plain+boxed", 28)
    # plain MNIST has a black (-1) border: the frame is white, the inside unchanged
    assert torch.all(boxed[..., 0, :] == 1) and torch.all(boxed[..., :, -1] == 1)
    assert torch.equal(boxed[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1])
    small = render_style(x[:4], "plain+small", 28)
    # the digit sits in the top-left quarter; the rest is background
    assert torch.all(small[..., 14:, :] == -1) and torch.all(small[..., :, 14:] == -1)
    assert small.amax() == 1


def test_unseen_styles_by_hand():
    """``outline``: one lit pixel becomes the ring of its 8 neighbours, the pixel
    itself dark; ``striped``: two rows at 0.45, two off, under the digit."""
    dot = np.zeros((1, 16, 16), np.uint8)
    dot[0, 8, 8] = 255
    ring = render_style(dot, "outline", 16)[0, 0]
    want = torch.full((16, 16), -1.0)
    want[7:10, 7:10] = 1.0
    want[8, 8] = -1.0
    assert torch.equal(ring, want)
    stripes = render_style(np.zeros((1, 16, 16), np.uint8), "striped", 16)[0, 0]
    on = torch.tensor([(r // 2) % 2 == 0 for r in range(16)])
    torch.testing.assert_close(stripes[on], torch.full((8, 16), -0.1))
    assert torch.all(stripes[~on] == -1)
    lit = render_style(dot, "striped", 16)[0, 0]
    assert lit[8, 8] == 1 and lit[10, 0] == -1 and lit[8, 0] == pytest.approx(-0.1)
    for s in UNSEEN_STYLES:
        assert not seen_in_pretraining(s) and not seen_in_pretraining(s + "+boxed")
    assert seen_in_pretraining("thick") and not seen_in_pretraining("thick+boxed")


def test_unseen_domains_are_validated():
    from methods import ConfigError, build_config

    assert "thick+boxed" in build_config({"domains": "thick+boxed"}).domains
    with pytest.raises(ConfigError, match="sepia"):
        build_config({"domains": "thick+sepia"})
    with pytest.raises(ValueError, match="transform"):
        render_style(np.zeros((1, 28, 28), np.uint8), "thick+sepia")
    from common.mnist_domains import caption

    assert caption(3, "thick+mirrored") == caption(3, "thick")


def test_dataset_registry_resolves_every_kind(tmp_path):
    from tiny_stack import FOLDER_CLASSES, make_hf_dataset, make_image_folder

    from common.datasets import DataArgs, dataset_info, get_source

    folder = make_image_folder(tmp_path / "folder", 10)
    hf = make_hf_dataset(tmp_path / "hf", 10)
    assert get_source("mnist-domains").kind == "mnist"
    assert get_source(str(hf)).kind == "huggingface"
    assert get_source(str(folder)).kind == "imagefolder"
    assert get_source("someone/some-dataset").kind == "huggingface"  # a hub id
    # the server knows MNIST's and a HF schema's classes, not a folder's
    assert dataset_info(DataArgs("mnist")).class_names[0] == "zero"
    assert dataset_info(DataArgs(str(hf))).class_names == FOLDER_CLASSES
    assert dataset_info(DataArgs(str(folder))) is None
    parts = [load_client_data(str(hf), "iid", i, 2, image_size=16) for i in range(2)]
    assert sum(len(p.train_labels) + len(p.test_labels) for p in parts) == 30
    assert parts[0].train_images.shape[1:] == (1, 16, 16)
    assert parts[0].class_names == list(FOLDER_CLASSES)
    assert parts[0].info.class_prompt(1) == "a photo of a cross"


def test_unopenable_dataset_names_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such-dataset"):
        load_client_data("no/such-dataset", "iid", 0, 2)


def test_dirichlet_partitions_a_thousand_clients():
    """flwr-datasets gives up on 1,000 Dirichlet partitions of the 30,000-image
    client pool with at least 10 examples each; the split falls back to at least
    5, then 2, and every partition can be loaded (the fleet's size)."""
    import numpy as np

    from common.datasets import DataArgs
    from common.datasets.partitions import partition_indices

    labels = np.repeat(np.arange(10), 3000)
    args = DataArgs("mnist-domains", partition="dirichlet", alpha=0.5, seed=0)
    sizes = [len(partition_indices(labels, None, args, p, 1000)) for p in (0, 999)]
    assert min(sizes) >= 2
    # sizes that worked before keep their partitions (min_partition_size 10)
    small = [partition_indices(labels, None, args, p, 4) for p in range(4)]
    assert min(len(x) for x in small) >= 10
    assert len(np.unique(np.concatenate(small))) == len(labels)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological", "domain"])
def test_a_kept_partitioning_gives_what_a_fresh_one_gives(partition, monkeypatch):
    """The process keeps a partitioning by its pool and settings: any order of
    clients gets what each would get alone; another seed, alpha, pool or number
    of partitions is not served from the kept one."""
    import numpy as np

    from common.datasets import DataArgs
    from common.datasets import partitions as P

    monkeypatch.setenv("ONESHOT_PARTITION_CACHE", "off")  # this process's cache
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 3000)
    domains = np.array(["a", "b", "c"])[rng.integers(0, 3, 3000)]
    args = DataArgs("x", partition=partition, alpha=0.3, seed=5)

    def fresh(a, pid, n=6, lab=labels):
        P._CACHE.clear()
        return P.partition_indices(lab, domains, a, pid, n)

    alone = [fresh(args, p) for p in range(6)]
    P._CACHE.clear()
    kept = {
        p: P.partition_indices(labels, domains, args, p, 6) for p in (5, 0, 3, 1, 4, 2)
    }
    assert len(P._CACHE) == 1
    for p in range(6):
        assert np.array_equal(kept[p], alone[p])
    # the caller may edit what it got: the kept partitioning is unchanged
    kept[0][:] = -1
    assert np.array_equal(P.partition_indices(labels, domains, args, 0, 6), alone[0])
    # object arrays (a Hugging Face column) and fixed-width strings: one key
    P.partition_indices(labels, domains.astype(object), args, 0, 6)
    assert len(P._CACHE) == 1
    rolled = np.roll(labels, 1)
    variants = {  # name: (labels, args, num_partitions)
        "seed": (labels, DataArgs("x", partition=partition, alpha=0.3, seed=6), 6),
        "alpha": (labels, DataArgs("x", partition=partition, alpha=3.0, seed=5), 6),
        "pool": (rolled, args, 6),
        "size": (labels, args, 5),
    }
    want = {k: fresh(a, 0, n, lab) for k, (lab, a, n) in variants.items()}
    P._CACHE.clear()
    P.partition_indices(labels, domains, args, 0, 6)
    for k, (lab, a, n) in variants.items():
        assert np.array_equal(P.partition_indices(lab, domains, a, 0, n), want[k]), k
    assert len(P._CACHE) == P._CACHE_SIZE  # the oldest of five is dropped


def test_a_client_partitions_without_flwr_datasets_plotting_package():
    """A ClientApp process loads its partition without seaborn / matplotlib
    (flwr-datasets' package init imports them); the real plotting module is
    still importable afterwards."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from methods import build_config\n"
        "from client_app.app import client_data\n"
        "cfg = build_config({'method': 'local', 'max-examples-per-client': 60})\n"
        "assert len(client_data(cfg, 0, 3).train_labels) > 0\n"
        "print(sorted(m for m in ('seaborn', 'matplotlib') if m in sys.modules))\n"
        "import flwr_datasets.visualization as v\n"
        "print(hasattr(v, 'plot_label_distributions'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout


def _partition_pool() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 3000)
    domains = np.array(["a", "b", "c"])[rng.integers(0, 3, 3000)]
    return labels, domains


@pytest.mark.parametrize("partition", ["dirichlet", "domain"])
def test_a_partition_kept_on_disk_is_read_back_by_the_next_process(
    partition, tmp_path, monkeypatch
):
    """Flower starts a fresh ClientApp process per message: the first computes a
    partition and keeps it on disk; the next gets the same indices from the file
    without partitioning. A damaged file is not trusted, and "off" keeps
    nothing. (A new process is stood in for by emptying this process's caches;
    the test below checks one real fresh process.)"""
    from common.datasets import DataArgs
    from common.datasets import partitions as P

    monkeypatch.setenv("ONESHOT_PARTITION_CACHE", str(tmp_path / "kept"))
    computed: list[int] = []
    real = P._partitioning

    def counted(*a, **k):
        computed.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "_partitioning", counted)
    labels, domains = _partition_pool()
    args = DataArgs("x", partition=partition, alpha=0.3, seed=5)

    def next_process(pid: int) -> tuple[np.ndarray, int]:
        monkeypatch.setattr(P, "_CACHE", type(P._CACHE)())
        monkeypatch.setattr(P, "_KEPT_HERE", set())
        before = len(computed)
        idx = P.partition_indices(labels, domains, args, pid, 6)
        return idx, len(computed) - before

    first, n = next_process(2)
    assert n == 1 and len(first) > 0
    [kept] = (tmp_path / "kept").glob("*/2.npy")
    assert np.array_equal(np.load(kept), first)
    again, n = next_process(2)
    assert n == 0 and np.array_equal(again, first)
    other, n = next_process(3)  # another partition: computed, not the kept one
    assert n == 1 and len(other) > 0 and not set(other) & set(first)
    # a damaged file is recomputed (and the right indices come back) ...
    np.save(kept, np.array([3000, 1, 1], dtype=np.int64))
    fixed, n = next_process(2)
    assert n == 1 and np.array_equal(fixed, first)
    assert np.array_equal(np.load(kept), first)  # ... and kept again
    kept.write_bytes(b"not an npy file")
    fixed, n = next_process(2)
    assert n == 1 and np.array_equal(fixed, first)
    assert np.array_equal(np.load(kept), first)
    # another pool, other settings: another file
    shifted = DataArgs("x", partition=partition, alpha=0.3, seed=6)
    P._CACHE.clear()
    P.partition_indices(labels, domains, shifted, 2, 6)
    assert len(list((tmp_path / "kept").glob("*/2.npy"))) == 2
    # off: nothing read or written
    monkeypatch.setenv("ONESHOT_PARTITION_CACHE", "off")
    again, n = next_process(2)
    assert n == 1 and np.array_equal(again, first)
    _, n = next_process(4)
    assert n == 1 and not list((tmp_path / "kept").glob("*/4.npy"))


_PARTITION_IN_A_FRESH_PROCESS = """
import sys, numpy as np
from common.datasets import DataArgs
from common.datasets.partitions import partition_indices
rng = np.random.default_rng(1)
labels = rng.integers(0, 10, 3000)
domains = np.array(["a", "b", "c"])[rng.integers(0, 3, 3000)]
for i, partition in enumerate(("dirichlet", "domain")):
    args = DataArgs("x", partition=partition, alpha=0.3, seed=5)
    np.save(f"{sys.argv[1]}/{partition}.npy", partition_indices(labels, domains, args, 2, 6))
print("imported datasets" if "datasets" in sys.modules else "no datasets")
"""


def test_a_fresh_process_reads_a_kept_partition_without_importing_datasets(
    tmp_path, monkeypatch
):
    """What the disk copy is for: a new ClientApp process of the same device
    gets its partition with numpy alone (datasets and flwr-datasets cost ~1 s of
    a 2-core CPU per message). The pool and settings match the script's."""
    import os
    import subprocess
    import sys

    from common.datasets import DataArgs
    from common.datasets import partitions as P

    monkeypatch.setenv("ONESHOT_PARTITION_CACHE", str(tmp_path / "kept"))
    monkeypatch.setattr(P, "_KEPT_HERE", set())
    P._CACHE.clear()
    labels, domains = _partition_pool()
    here = {
        p: P.partition_indices(labels, domains, DataArgs("x", partition=p, alpha=0.3, seed=5), 2, 6)
        for p in ("dirichlet", "domain")
    }  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _PARTITION_IN_A_FRESH_PROCESS, str(tmp_path)],
        env=os.environ | {"ONESHOT_PARTITION_CACHE": str(tmp_path / "kept")},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "no datasets"
    for p, idx in here.items():
        assert np.array_equal(np.load(tmp_path / f"{p}.npy"), idx), p
