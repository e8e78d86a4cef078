"""Datasets behind a registry: each returns one ``DatasetInfo`` and loads a client's
partition.

A ``dataset`` value is resolved in this order (``registry.DATASETS``):

* ``mnist-domains``: the clients' half of MNIST (``common.mnist_domains``), client
  ``i`` rendered in ``domains[i mod K]``; ``mnist``: the same, plain (``mnist``);
* a local Hugging Face dataset folder (written by ``Dataset.save_to_disk``)
  (``huggingface``);
* a local image folder (``<class>/<image>`` or ``<domain>/<class>/<image>``)
  (``image_folder``);
* anything else is a Hugging Face hub id (``datasets.load_dataset``).

Partitions are computed with flwr-datasets partitioners, as Flower's examples do
(``partitions``). The server learns the classes from ``dataset_info`` where the
dataset can say without reading a client's images (MNIST, a Hugging Face schema);
for an image folder (the clients' own files) it returns ``None`` and the server
takes a vote over the replies that passed validation.

``global_test_set`` is the test set one-shot FL papers report: the dataset's
test split in the domain of every participating client, balanced over classes
(the clients' held-out splits carry their label skew and favour a model trained
on their own data).
"""

from .base import (
    GLOBAL_METRIC,
    GLOBAL_SIZE_METRIC,
    GLOBAL_TEST_PER_CLASS,
    NO_GLOBAL_TEST,
    ClientData,
    DataArgs,
    DatasetInfo,
    DatasetSource,
    GlobalTestSet,
    pil_to_tensor,
)
from .huggingface import HuggingFaceSource
from .image_folder import IMAGE_SUFFIXES, ImageFolderSource
from .mnist import MnistSource
from .registry import (
    DATASETS,
    dataset_info,
    federation_domains,
    get_source,
    global_test_set,
    known_domains,
    load_client_data,
    participating_domains,
    public_pairs,
)

__all__ = [
    "DATASETS",
    "GLOBAL_METRIC",
    "GLOBAL_SIZE_METRIC",
    "GLOBAL_TEST_PER_CLASS",
    "IMAGE_SUFFIXES",
    "NO_GLOBAL_TEST",
    "ClientData",
    "DataArgs",
    "DatasetInfo",
    "DatasetSource",
    "GlobalTestSet",
    "HuggingFaceSource",
    "ImageFolderSource",
    "MnistSource",
    "dataset_info",
    "federation_domains",
    "get_source",
    "global_test_set",
    "known_domains",
    "load_client_data",
    "participating_domains",
    "pil_to_tensor",
    "public_pairs",
]
