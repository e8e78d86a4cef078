"""``mnist-domains`` and ``mnist``: the clients' half of MNIST
(``common.mnist_domains``), client ``i`` rendered in ``domains[i mod K]``, or
plain."""

from __future__ import annotations

import numpy as np
import torch

from .. import mnist_domains
from .base import ClientData, DataArgs, DatasetInfo, GlobalTestSet
from .partitions import balanced_ids, cap_examples, client_split, partition_indices


class MnistSource:
    """The clients' half of MNIST, in the styles of ``domains`` or plain."""

    kind = "mnist"

    def matches(self, name: str) -> bool:
        """``mnist-domains`` or ``mnist``."""
        return name in ("mnist-domains", "mnist")

    def info(self, args: DataArgs) -> DatasetInfo:
        """The ten digits, in ``args.domains`` (``mnist-domains``) or plain."""
        domains = args.domains if args.dataset == "mnist-domains" else ("plain",)
        return DatasetInfo(args.dataset, mnist_domains.DIGIT_NAMES, 1, domains, True)

    def load(
        self, args: DataArgs, partition_id: int, num_partitions: int
    ) -> ClientData:
        """A partition of the client pool rendered in the partition's domain."""
        raw, labels = mnist_domains.mnist_client_pool()
        styled = args.dataset == "mnist-domains"
        pool_domains = (
            np.asarray(
                [args.domains[j % len(args.domains)] for j in range(len(labels))]
            )
            if styled
            else None
        )
        idx = partition_indices(
            labels, pool_domains, args, partition_id, num_partitions
        )
        if not styled:
            domain = "plain"
        elif args.partition == "domain" and pool_domains is not None:
            domain = str(pool_domains[idx[0]])
        else:
            domain = args.domains[partition_id % len(args.domains)]
        idx = cap_examples(idx, args, partition_id)
        images = mnist_domains.render_style(
            raw[idx], domain, args.image_size, seed=args.seed + partition_id
        )
        y = torch.as_tensor(labels[idx])
        return client_split(images, y, domain, self.info(args), args, partition_id)

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
        styled = mnist_domains.public_styled_set(args.image_size, seed=args.seed)
        g = np.random.default_rng(args.seed)
        idx = np.sort(
            g.choice(len(styled.labels), size=min(n, len(styled.labels)), replace=False)
        )
        caps = [
            mnist_domains.caption(
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
        raw, labels = mnist_domains.load_mnist("test")
        ids = balanced_ids(labels, len(mnist_domains.DIGIT_NAMES), per_class, args.seed)
        images = torch.cat(
            [
                mnist_domains.render_style(raw[ids], d, args.image_size, seed=args.seed)
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
