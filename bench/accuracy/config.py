"""The accuracy bench's methods, worlds and per-run overrides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ORACLE = "centralized"

# Run-config overrides of each benchmarked method (``None``: computed in-process).
METHODS: dict[str, dict[str, Any] | None] = {
    "oscar": {"method": "oscar"},
    "oscar-oracle": {"method": "oscar", "captioner": "oracle"},
    "oscar-dp": {"method": "oscar", "dp-epsilon": 1.0, "prototypes-per-class": 1},
    "class-names": {"method": "class-names"},
    "fedavg": {"method": "fedavg"},
    "local": {"method": "local"},
    "feddisc": {"method": "feddisc"},
    "feddeo": {"method": "feddeo"},
    "fedlmg": {"method": "fedlmg"},
    "fedlmg-hetero": {"method": "fedlmg", "fedlmg-client-classifiers": "cnn,resnet18"},
    "dense": {"method": "dense"},
    "feddiff": {"method": "feddiff"},
    # every client starts from public-only's classifier (``classifier-init``, issue 23)
    "feddiff-public-init": {"method": "feddiff", "classifier-init": "public"},
    "fedavg-public-init": {"method": "fedavg", "classifier-init": "public"},
    "fedhydra": {"method": "fedhydra"},
    "guha": {"method": "guha"},
    "dosfl": {"method": "dosfl"},
    "fedbip": {"method": "fedbip"},
    "fgl-instance": {"method": "fgl-instance"},
    "fedld": {"method": "fedld"},
    "public-only": {"method": "public-only"},
    "zero-shot": {"method": "zero-shot"},
    ORACLE: None,
}

# What the server knows without any client (issue 23): every method's table row
# is compared with these, paired over seeds.
FLOORS = ("public-only", "zero-shot")

# oscar-oracle, oscar-dp and fedlmg-hetero stay out of the default table to keep
# --quick shorter on the 2-core CPU (--methods adds them).
DEFAULT_METHODS = (
    "oscar",
    "feddisc",
    "feddeo",
    "fedlmg",
    "class-names",
    "fedavg",
    "dense",
    "feddiff",
    "feddiff-public-init",
    "fedavg-public-init",
    "fedhydra",
    "guha",
    "dosfl",
    "fedbip",
    "fgl-instance",
    "fedld",
    "local",
    *FLOORS,
    ORACLE,
)

# Rows read from a method's results.json (computed in the same run, same seed):
# FedDiff's references (the pool's best model alone; the clients' average with the
# generated subset taken from the pool's best).
# Its fair averaging baseline is the average of the same uploads
# (`feddiff:fedavg`): the same clients' weights, without the weights diffusion.
REFERENCES = {
    "feddiff:fedavg": ("feddiff", "fedavg"),
    "feddiff:pool-best": ("feddiff", "pool-best"),
    "feddiff:average-with-pool-subset": ("feddiff", "average-with-pool-subset"),
}

# Paired per-seed differences of global accuracy reported (A, B): every diffusion
# method against the prompt-only baseline, the model-based ones against averaging.
PAIRS = (
    ("oscar", "class-names"),
    ("feddisc", "class-names"),
    ("feddeo", "class-names"),
    ("fedlmg", "class-names"),
    ("fedlmg", "fedavg"),
    ("fedlmg-hetero", "fedavg"),
    ("dense", "fedavg"),
    ("feddiff", "feddiff:fedavg"),
    ("feddiff", "feddiff:pool-best"),
    ("feddiff", "feddiff:average-with-pool-subset"),
    ("feddiff-public-init", "feddiff"),
    ("fedavg-public-init", "fedavg"),
    # the orderings of the newer methods' papers against their own baselines
    ("fedhydra", "dense"),
    ("guha", "fedavg"),
    ("dosfl", "fedavg"),
    ("fedbip", "feddisc"),
    ("fedbip", "class-names"),
    ("fgl-instance", "class-names"),
    ("fedld", "class-names"),
)


def floor_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, floor) for every benchmarked method that is not a floor or the
    oracle, against each floor: a family of its own for Holm's correction."""
    return [(m, f) for m in methods if m not in FLOORS and m != ORACLE for f in FLOORS]


# --quick: the default world (partition, domains, image size, generator, sampler,
# epochs) with fewer examples per client; smaller batches keep the number of
# optimizer steps up on the smaller sets. Every synthesizing method gets the same
# budget, 30 images per (client, class) (FedLMG's and FedDEO's paper setting;
# class-names: 30 x clients per class), instead of the default 50, so that the
# whole default table fits 40 minutes on the 2-core CPU (~20 s of Flower start-up
# per run).
QUICK_WORLD: dict[str, Any] = {
    "max-examples-per-client": 600,
    "train-batch-size": 32,
}

QUICK: dict[str, Any] = QUICK_WORLD | {"images-per-class": 30}

# Named worlds (``--world``): what the clients hold. ``held-out`` (issue 23):
# client i holds domain i mod 4, two of the styles the embedded stack was
# pretrained on and two it never saw (``common.mnist_domains.UNSEEN_STYLES``);
# the report gives the seen and the unseen domains apart.
# ``feature-skew``: the same four domains, every client with every class (IID
# labels): only the styles differ between clients.
WORLDS: dict[str, dict[str, Any]] = {
    "default": {},
    "held-out": {"domains": "inverted,thick,outline,striped"},
    "feature-skew": {"domains": "inverted,thick,outline,striped", "partition": "iid"},
}

QUICK_FID_PER_CLASS = 16

FULL_FID_PER_CLASS = 64

NOTES = (
    "global acc: accuracy on the global test set, the dataset's test split (MNIST's "
    "official test set) in the domain of every client, balanced over classes: the "
    "global model's, or for `local` the mean over clients of each client's own model's; "
    "the mean over seeds of each run's `global_accuracy`.",
    f"`{ORACLE}` is an oracle computed in-process, not through Flower: the same "
    "classifier (`classifier`, `train-epochs`, `learning-rate`) trained on the union of "
    "the real training data of all clients and evaluated on the same global test set "
    "and on each client's held-out split.",
    f"gap = method - {ORACLE} (accuracy points); std is the sample std over seeds "
    "(n-1); mean client acc is the mean over seeds of each run's mean accuracy on "
    "the clients' own held-out splits (they carry each client's label skew).",
    "wall s/run: the whole `flwr run` command (SuperLink/simulation start-up, client "
    f"and server work); for `{ORACLE}`, the in-process data loading and training.",
    "upload B/client: what one client uploads once (fp16 embeddings for oscar, the "
    "model weights for fedavg, nothing for class-names and local).",
)


def base_overrides(
    quick: bool,
    num_clients: int,
    extra: dict[str, Any] | None = None,
    world: str = "default",
) -> dict[str, Any]:
    """Overrides shared by every run of one benchmark (the seed and method come
    on top): the quick settings, the world's (``WORLDS``), then ``extra``.

    Raises
    ------
    ValueError
        If ``world`` is not one of ``WORLDS``.
    """
    if world not in WORLDS:
        raise ValueError(f"--world {world!r}: use one of {', '.join(WORLDS)}")
    over: dict[str, Any] = (dict(QUICK) if quick else {}) | WORLDS[world]
    # Wait for all simulated clients, not just the default min-clients.
    over["min-clients"] = num_clients
    return over | dict(extra or {})


def run_overrides(method: str, seed: int, base: dict[str, Any]) -> dict[str, Any]:
    """The run config overrides of one ``flwr run``: ``base``, the method's keys,
    the seed.

    Raises
    ------
    ValueError
        If ``method`` is computed in-process (the centralized oracle).
    """
    spec = METHODS[method]
    if spec is None:
        raise ValueError(f"method {method!r} is computed in-process, not with flwr run")
    return base | spec | {"seed": seed}


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """``["oscar,fedavg", "local"]`` -> ``["oscar", "fedavg", "local"]`` (checked)."""
    if not values:
        return list(DEFAULT_METHODS)
    names = [m.strip() for v in values for m in v.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))
