"""``save-synthetic``: the synthetic training set as a ``save_to_disk`` folder
(``common.synthetic_set``), written by ``methods.steps.synthesize_set``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.datasets import DataArgs, dataset_info, load_client_data
from common.synthetic_set import SYNTHETIC_DIR, save_synthetic_set

NAMES = ["cat", "dog", "owl"]


def _rows(n: int, channels: int, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g).to(
        torch.uint8
    )
    labels = torch.arange(n) % len(NAMES)
    clients = torch.arange(n) % 4 - 1  # -1 (no client), 0, 1, 2
    return images, labels, clients


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_gives_the_same_pixels_labels_clients_and_sources(
    tmp_path, channels
):
    import datasets

    images, labels, clients = _rows(7, channels)
    sources = [f"oscar:embedding{i % 2}" for i in range(7)]
    path = save_synthetic_set(
        tmp_path / "syn", images, labels, clients, sources, NAMES, chunk_rows=3
    )
    assert path == tmp_path / "syn"
    # nothing left beside it (the temporary folder is gone)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]
    ds = datasets.load_from_disk(str(path))
    assert ds.column_names == ["image", "label", "client", "source"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == NAMES
    assert ds["client"] == clients.tolist()
    assert ds["source"] == sources
    assert [ds.features["label"].int2str(y) for y in ds["label"]] == [
        NAMES[y] for y in labels.tolist()
    ]
    for i, im in enumerate(ds["image"]):
        assert im.format == "PNG" and im.mode == ("L" if channels == 1 else "RGB")
        arr = np.asarray(im)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        assert np.array_equal(arr, images[i].numpy())


def test_replace_and_append(tmp_path):
    import datasets

    images, labels, clients = _rows(5, 1)
    path = tmp_path / "syn"
    save_synthetic_set(path, images, labels, clients, "a:x", NAMES)
    save_synthetic_set(path, images[:2], labels[:2], clients[:2], "b:y", NAMES)
    assert datasets.load_from_disk(str(path))["source"] == ["b:y"] * 2  # replaced
    save_synthetic_set(path, images, labels, clients, "c:z", NAMES, append=True)
    ds = datasets.load_from_disk(str(path))
    assert ds["source"] == ["b:y"] * 2 + ["c:z"] * 5
    assert ds["label"] == labels[:2].tolist() + labels.tolist()
    with pytest.raises(ValueError, match="features"):  # other classes
        save_synthetic_set(path, images, labels, clients, "d", NAMES + ["x"], True)
    assert len(datasets.load_from_disk(str(path))) == 7  # untouched


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"images": torch.zeros(2, 1, 4, 4)}, "uint8"),
        ({"images": torch.zeros(2, 2, 4, 4, dtype=torch.uint8)}, "C 1 or 3"),
        ({"labels": torch.tensor([0, 3])}, "outside the 3 class names"),
        ({"clients": torch.tensor([0])}, "one entry per image"),
        ({"sources": ["a"]}, "sources has 1 entries for 2 rows"),
        ({"class_names": []}, "class_names is empty"),
    ],
)
def test_bad_input_is_refused_with_the_fix(tmp_path, over, match):
    args = {
        "images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        "labels": torch.tensor([0, 1]),
        "clients": torch.tensor([0, -1]),
        "sources": "s",
        "class_names": NAMES,
    } | over
    with pytest.raises(ValueError, match=match):
        save_synthetic_set(tmp_path / "syn", **args)
    assert not (tmp_path / "syn").exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_the_dataset_registry_opens_it_as_a_training_set(tmp_path, channels):
    images, labels, clients = _rows(30, channels, size=8)
    path = save_synthetic_set(tmp_path / "syn", images, labels, clients, "s", NAMES)
    info = dataset_info(DataArgs(str(path)))
    assert info is not None
    assert info.class_names == tuple(NAMES)
    assert info.channels == channels and info.domains == ()
    data = load_client_data(str(path), "iid", 0, 1, image_size=8)
    assert data.channels == channels and data.domain == "plain"
    assert data.class_names == NAMES
    assert len(data.train_labels) + len(data.test_labels) == 30
    # the pixels come back as the registry's [-1, 1] floats
    x = torch.cat([data.train_images, data.test_images])
    assert x.shape[1:] == (channels, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_synthesize_set_appends_within_one_server_work(tiny_stack, fast_config):
    from methods import build_config
    from methods.base import ServerContext, ServerOutput
    from methods.steps import synthesize_set

    cfg = build_config(fast_config | {"save-synthetic": True})
    run_dir = Path(fast_config["output-dir"]) / "direct"
    ctx = ServerContext(cfg, run_dir, info=dataset_info(cfg.data_args()))
    conds = ctx.uncond.repeat(3, *([1] * (ctx.uncond.ndim - 1)))
    y, owners = torch.tensor([0, 1, 2]), torch.tensor([0, 0, -1])
    out = ServerOutput()
    synthesize_set(ctx, conds, y, owners, out, source="a:first")
    synthesize_set(ctx, conds[:2], y[:2], owners[:2], out)  # default: the method
    assert out.extra["synthetic_set"] == {
        "path": str(run_dir / SYNTHETIC_DIR),
        "rows": 5,
    }
    import datasets

    ds = datasets.load_from_disk(str(run_dir / SYNTHETIC_DIR))
    assert ds["source"] == ["a:first"] * 3 + [cfg.method] * 2
    assert ds["client"] == [0, 0, -1, 0, 0]
    # a new server work (a round redone) replaces what an earlier one left
    synthesize_set(ctx, conds[:1], y[:1], owners[:1], ServerOutput())
    assert len(datasets.load_from_disk(str(run_dir / SYNTHETIC_DIR))) == 1


def test_a_round_with_save_synthetic_writes_the_set_it_trains_on(
    tiny_stack, fast_config
):
    import datasets

    from deploy.inprocess import partition_fleet, run_round

    rc = fast_config | {
        "method": "oscar",
        "collect-quiet-s": 0.0,
        "collect-window-s": 30.0,
    }
    res, _ = run_round(partition_fleet(3), rc | {"save-synthetic": True})
    run_dir = Path(fast_config["output-dir"]) / "inprocess"
    on_disk = json.loads((run_dir / "results.json").read_text())
    n = on_disk["num_synthetic"]
    assert n > 0
    assert on_disk["synthetic_set"] == {
        "path": str(run_dir / SYNTHETIC_DIR),
        "rows": n,
    }
    ds = datasets.load_from_disk(str(run_dir / SYNTHETIC_DIR))
    assert len(ds) == n
    assert ds.features["label"].names == on_disk["class_names"]
    assert set(ds["source"]) == {"oscar:caption-embedding"}  # what conditioned them
    assert set(ds["client"]) <= {-1, 0, 1, 2}
    assert np.asarray(ds[0]["image"]).shape == (16, 16)  # mnist-domains: L, 16 px
    # the default: nothing is written
    out2 = Path(fast_config["output-dir"]).parent / "out2"
    run_round(partition_fleet(3), rc | {"output-dir": str(out2)})
    results = json.loads((out2 / "inprocess" / "results.json").read_text())
    assert "synthetic_set" not in results
    assert not (out2 / "inprocess" / SYNTHETIC_DIR).exists()
