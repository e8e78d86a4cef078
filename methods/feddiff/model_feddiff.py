"""FedDiff's generative part, after p-diff (Wang et al. 2024, "Neural Network
Diffusion"): a weight pool, an autoencoder over the flattened parameter subset and
a latent DDPM with a 1-D CNN denoiser; built from public data by
``python -m bench pretrain --stage feddiff`` and saved as one folder::

    config.json               subset, sizes, normalisation, build settings, metrics
    autoencoder.safetensors   WeightAE (encoder -> mu, log-variance; decoder)
    denoiser.safetensors      LatentDenoiser (epsilon prediction)
    pool.safetensors          pool latents (frozen encoder, mu), pool accuracies,
                              per-coordinate mean and the scalar scale of the subset
    pool_best/                the pool's best classifier, whole (config + weights)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.synthesis import from_uint8, to_uint8

from . import maths_feddiff as M

# ------------------------------------------------------------------ the subset


def subset_names(model: nn.Module, spec: str) -> list[str]:
    """The parameters ``spec`` names: comma-separated parameter names or module
    prefixes (``head`` -> ``head.weight``, ``head.bias``), in the model's order.

    Raises ``ValueError`` naming every item that matches no parameter.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()]
    names = [n for n, _ in model.named_parameters()]
    missing = [
        it for it in items if not any(n == it or n.startswith(it + ".") for n in names)
    ]
    if not items or missing:
        raise ValueError(
            f"{missing or spec!r} name no parameter of the classifier; its parameters "
            f"are {', '.join(names)}"
        )
    return [n for n in names if any(n == it or n.startswith(it + ".") for it in items)]


def flatten_subset(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The parameters ``names`` of ``state``, flattened and concatenated (float)."""
    return torch.cat([state[n].detach().float().reshape(-1) for n in names])


def unflatten_subset(
    vec: torch.Tensor, names: list[str], shapes: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """The inverse of ``flatten_subset``: ``{name: tensor of shapes[name]}``."""
    out, i = {}, 0
    for n in names:
        k = math.prod(shapes[n])
        out[n] = vec[i : i + k].reshape(shapes[n]).clone()
        i += k
    if i != vec.numel():
        raise ValueError(f"subset vector has {vec.numel()} values, the names {i}")
    return out


# ------------------------------------------------------------------ networks


class WeightAE(nn.Module):
    """1-D convolutional autoencoder over a flattened parameter vector (p-diff).

    The encoder gives ``(mu, log_var)`` of a latent of ``latent`` values; the
    decoder maps a latent back to the vector (zero-padded to a multiple of
    ``2**len(channels)`` inside).
    """

    def __init__(
        self,
        dim: int,
        latent: int = 64,
        channels: tuple[int, ...] = (4, 8, 8, 16, 16),
        kernel: int = 7,
    ):
        super().__init__()
        self.dim, self.latent = dim, latent
        down = 2 ** len(channels)
        self.padded = -(-dim // down) * down
        self.last = self.padded // down
        self.channels = tuple(channels)
        enc: list[nn.Module] = []
        cin = 1
        for c in channels:
            enc += [nn.Conv1d(cin, c, kernel, 2, kernel // 2), nn.LeakyReLU(0.2)]
            cin = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        flat = channels[-1] * self.last
        self.to_mu = nn.Linear(flat, latent)
        self.to_logvar = nn.Linear(flat, latent)
        self.from_latent = nn.Linear(latent, flat)
        dec: list[nn.Module] = []
        rev = list(channels[::-1])
        for a, b in zip(rev, rev[1:] + [rev[-1]], strict=True):
            dec += [
                nn.ConvTranspose1d(a, b, kernel, 2, kernel // 2, output_padding=1),
                nn.LeakyReLU(0.2),
            ]
        self.decoder = nn.Sequential(
            *dec, nn.Conv1d(rev[-1], 1, kernel, 1, kernel // 2)
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log_var)``, each ``[n, latent]``, of flattened vectors ``x``
        ``[n, dim]``; ``log_var`` clamped to ``[-20, 10]``."""
        h = self.encoder(F.pad(x, (0, self.padded - self.dim))[:, None, :])
        return self.to_mu(h), self.to_logvar(h).clamp(-20, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``z`` ``[n, latent]`` -> vectors ``[n, dim]`` (the padding dropped)."""
        h = self.from_latent(z).view(-1, self.channels[-1], self.last)
        return self.decoder(h)[:, 0, : self.dim]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[sin(t f_k), cos(t f_k)]``, ``f_k = 10000^(-k/half)``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10_000) * torch.arange(half, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.sin(), args.cos()], dim=1)


class LatentDenoiser(nn.Module):
    """The latent DDPM's epsilon predictor (Eq. 7): a 1-D CNN over the latent as a
    one-channel sequence; residual dilated conv blocks, each shifted by a
    projection of the sinusoidal timestep embedding."""

    def __init__(
        self, latent: int, channels: int = 32, blocks: int = 4, time_dim: int = 64
    ):
        super().__init__()
        self.latent, self.time_dim = latent, time_dim
        self.time = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.inp = nn.Conv1d(1, channels, 3, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, 3, padding=2**i, dilation=2**i)
            for i in range(blocks)
        )
        self.temb = nn.ModuleList(nn.Linear(time_dim, channels) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.GroupNorm(8, channels) for _ in range(blocks))
        self.out = nn.Conv1d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted noise ``[n, latent]`` of noisy latents ``x`` ``[n, latent]``
        at timesteps ``t`` ``[n]``."""
        temb = self.time(timestep_embedding(t, self.time_dim))
        h = self.inp(x[:, None, :])
        for conv, proj, norm in zip(self.convs, self.temb, self.norms, strict=True):
            h = h + conv(F.silu(norm(h) + proj(temb)[:, :, None]))
        return self.out(F.silu(h))[:, 0, :]


# ------------------------------------------------------------------ the folder


@dataclass
class BuildSettings:
    """How the pool, the autoencoder and the latent DDPM are built."""

    params: str = "features.4.1,head"  # the generated subset (module prefixes)
    width: int = 32  # SmallCNN width
    pool_steps: int = 2_000  # SGD steps on the proxy data
    save_every: int = 10  # the paper: keep the weights every 10 steps
    sgd_lr: float = 0.05
    sgd_momentum: float = 0.9
    batch: int = 64
    eval_images: int = 1_000  # public held-out images that rank the pool
    latent: int = 64
    ae_channels: tuple[int, ...] = (4, 8, 8, 16, 16)
    ae_steps: int = 1_500
    ae_batch: int = 50
    ae_lr: float = 1e-3
    input_noise: float = 0.001  # p-diff's input noise augmentation
    latent_noise: float = 0.1  # p-diff's latent noise augmentation
    kl_weight: float = 1e-4
    ddpm_steps: int = 1000  # T of the forward process
    denoiser_channels: int = 32
    denoiser_blocks: int = 4
    denoiser_train_steps: int = 2_000
    denoiser_batch: int = 100
    denoiser_lr: float = 1e-3


@dataclass
class FedDiffModel:
    """The loaded folder."""

    config: dict[str, Any]
    ae: WeightAE
    denoiser: LatentDenoiser
    pool_mu: (
        torch.Tensor
    )  # [N, latent], frozen encoder, sorted by accuracy (best first)
    pool_acc: torch.Tensor  # [N]
    mean: torch.Tensor  # [D]
    scale: float
    latent_scale: float
    pool_best: dict[str, torch.Tensor] = field(default_factory=dict)
    proxy_images: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # uint8
    proxy_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def names(self) -> list[str]:
        """The generated subset's parameter names, in the model's order."""
        return list(self.config["params"])

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Each generated parameter's shape."""
        return dict(self.config["shapes"])

    def normalise(self, vec: torch.Tensor) -> torch.Tensor:
        """A flattened subset -> the autoencoder's units (pool mean 0, scale 1)."""
        return (vec - self.mean) / self.scale

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``normalise``."""
        return x * self.scale + self.mean

    def classifier(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The classifier the pool was built of (``arch``, ``width``), with
        ``state`` loaded if given."""
        from common.models import build_classifier

        c = self.config
        net = build_classifier(
            c["arch"], c["in_channels"], c["num_classes"], c["width"]
        )
        if state is not None:
            net.load_state_dict(state)
        return net


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train_pool(
    images: torch.Tensor,
    labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    s: BuildSettings,
    *,
    arch: str,
    in_channels: int,
    num_classes: int,
    seed: int,
) -> tuple[list[str], dict[str, list[int]], torch.Tensor, torch.Tensor, dict]:
    """SGD on the proxy data; the subset every ``save_every`` steps, ranked by
    accuracy on ``eval_images``. Returns names, shapes, vectors ``[N, D]`` and
    accuracies ``[N]`` (best first), and the best checkpoint's whole state."""
    from common.models import build_classifier
    from common.train import accuracy, augment

    torch.manual_seed(seed)
    model = build_classifier(arch, in_channels, num_classes, s.width)
    names = subset_names(model, s.params)
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if n in names}
    opt = torch.optim.SGD(
        model.parameters(), lr=s.sgd_lr, momentum=s.sgd_momentum, weight_decay=5e-4
    )
    g = _seeded(seed)
    vecs, accs = [], []
    best: tuple[float, dict[str, torch.Tensor]] = (-1.0, {})
    for step in range(1, s.pool_steps + 1):
        model.train()
        idx = torch.randint(len(images), (s.batch,), generator=g)
        x = from_uint8(images[idx])
        loss = F.cross_entropy(model(augment(x, g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % s.save_every == 0:
            state = model.state_dict()
            acc = accuracy(model, eval_images, eval_labels)
            vecs.append(flatten_subset(state, names))
            accs.append(acc)
            if acc > best[0]:
                best = (acc, {k: v.detach().clone() for k, v in state.items()})
    order = torch.argsort(torch.tensor(accs), descending=True, stable=True)
    return names, shapes, torch.stack(vecs)[order], torch.tensor(accs)[order], best[1]


def train_autoencoder(x: torch.Tensor, s: BuildSettings, seed: int) -> WeightAE:
    """Eq. 5-6: noise on the input and on the latent, MSE reconstruction (plus a
    small KL so the encoder's sigma is a distribution FedDiff can superpose)."""
    torch.manual_seed(seed)
    ae = WeightAE(x.shape[1], s.latent, s.ae_channels)
    opt = torch.optim.AdamW(ae.parameters(), lr=s.ae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, s.ae_steps))
    g = _seeded(seed + 1)
    for _ in range(s.ae_steps):
        xb = x[torch.randint(len(x), (min(s.ae_batch, len(x)),), generator=g)]
        mu, logvar = ae.encode(xb + s.input_noise * torch.randn(xb.shape, generator=g))
        sigma = (0.5 * logvar).exp()
        z = mu + sigma * torch.randn(mu.shape, generator=g)
        z = z + s.latent_noise * torch.randn(mu.shape, generator=g)
        loss = F.mse_loss(ae.decode(z), xb) + s.kl_weight * M.kl_to_standard(mu, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return ae.eval()


def train_denoiser(z: torch.Tensor, s: BuildSettings, seed: int) -> LatentDenoiser:
    """Eq. 7: epsilon prediction on the (scaled) pool latents."""
    torch.manual_seed(seed)
    net = LatentDenoiser(z.shape[1], s.denoiser_channels, s.denoiser_blocks)
    opt = torch.optim.AdamW(net.parameters(), lr=s.denoiser_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, max(1, s.denoiser_train_steps)
    )
    abar = M.ddpm_schedule(s.ddpm_steps)["abar"]
    g = _seeded(seed + 2)
    for _ in range(s.denoiser_train_steps):
        x0 = z[torch.randint(len(z), (s.denoiser_batch,), generator=g)]
        t = torch.randint(s.ddpm_steps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(net(M.q_sample(x0, t, noise, abar), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def reconstruction_mse(ae: WeightAE, x: torch.Tensor) -> float:
    """Mean squared error of ``decode(mu(x))`` in normalised units (the pool's
    per-value variance is 1 there)."""
    mu, _ = ae.encode(x)
    return float(F.mse_loss(ae.decode(mu), x))


def build_feddiff(
    out: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    s: BuildSettings,
    *,
    arch: str = "cnn",
    in_channels: int = 1,
    num_classes: int = 10,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Build pool, autoencoder and latent DDPM from (public) proxy data; save under
    ``out``; return the folder's config (with metrics and wall times)."""
    from safetensors.torch import save_file

    from common.models import save_classifier

    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    names, shapes, vecs, accs, best = train_pool(
        images,
        labels,
        eval_images,
        eval_labels,
        s,
        arch=arch,
        in_channels=in_channels,
        num_classes=num_classes,
        seed=seed,
    )
    wall["pool"] = time.perf_counter() - t0
    log(
        f"feddiff pool: {len(vecs)} checkpoints of {vecs.shape[1]} values, accuracy "
        f"{float(accs[-1]):.3f} .. {float(accs[0]):.3f} ({wall['pool']:.0f} s)"
    )
    mean = vecs.mean(0)
    scale = float((vecs - mean).std().clamp_min(1e-8))
    x = (vecs - mean) / scale

    t0 = time.perf_counter()
    ae = train_autoencoder(x, s, seed)
    recon = reconstruction_mse(ae, x)
    wall["autoencoder"] = time.perf_counter() - t0
    log(
        f"feddiff autoencoder: reconstruction MSE {recon:.4f} (normalised) "
        f"({wall['autoencoder']:.0f} s)"
    )

    t0 = time.perf_counter()
    with torch.no_grad():
        mu, logvar = ae.encode(x)
    latent_scale = float(mu.std().clamp_min(1e-8))
    den = train_denoiser(mu / latent_scale, s, seed)
    wall["denoiser"] = time.perf_counter() - t0
    log(f"feddiff latent DDPM: {wall['denoiser']:.0f} s")

    settings = asdict(s)
    settings["ae_channels"] = list(s.ae_channels)
    cfg: dict[str, Any] = {
        "arch": arch,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "width": s.width,
        "params": names,
        "shapes": shapes,
        "dim": int(vecs.shape[1]),
        "scale": scale,
        "latent_scale": latent_scale,
        "seed": seed,
        "settings": settings,
    }
    built = FedDiffModel(
        cfg, ae, den, mu, accs, mean, scale, latent_scale, pool_best=best
    )
    # generated-from-noise samples of the DDPM, decoded: how well they classify
    sample_acc = _sample_accuracy(built, eval_images, eval_labels, seed)

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in ae.state_dict().items()},
        str(out / "autoencoder.safetensors"),
    )
    save_file(
        {k: v.contiguous() for k, v in den.state_dict().items()},
        str(out / "denoiser.safetensors"),
    )
    save_file(
        {
            "pool_mu": mu.contiguous(),
            "pool_accuracy": accs.float(),
            "mean": mean.contiguous(),
            "pool_sigma": (0.5 * logvar).exp().contiguous(),
            "proxy_images": to_uint8(eval_images).contiguous(),
            "proxy_labels": eval_labels.long(),
        },
        str(out / "pool.safetensors"),
    )
    save_classifier(
        built.classifier(best), out / "pool_best", arch, in_channels, num_classes
    )
    cfg |= {
        "pool": {
            "size": len(vecs),
            "accuracy_best": float(accs[0]),
            "accuracy_worst": float(accs[-1]),
            "accuracy_median": float(accs.median()),
        },
        "metrics": {
            "ae_recon_mse": recon,
            "ddpm_sample_accuracy": sample_acc,
            "proxy_train_images": len(labels),
            "proxy_eval_images": len(eval_labels),
        },
        "parameters": {
            "autoencoder": sum(p.numel() for p in ae.parameters()),
            "denoiser": sum(p.numel() for p in den.parameters()),
        },
        "wall_s": wall | {"total": sum(wall.values())},
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


@torch.no_grad()
def sample_latents(
    den: LatentDenoiser,
    x_t: torch.Tensor,
    start: int,
    sched: dict[str, torch.Tensor],
    g: torch.Generator,
) -> torch.Tensor:
    """Ancestral DDPM from step ``start`` (0-based, inclusive) down to 0."""
    for t in range(start, -1, -1):
        eps = den(x_t, torch.full((len(x_t),), t, dtype=torch.long))
        x_t = M.p_step(x_t, eps, t, sched, torch.randn(x_t.shape, generator=g))
    return x_t


def _sample_accuracy(
    model: FedDiffModel, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> list[float]:
    """Accuracy of 4 subsets generated from pure noise, on the pool-best backbone."""
    from common.train import accuracy

    g = _seeded(seed + 3)
    steps = int(model.config["settings"]["ddpm_steps"])
    sched = M.ddpm_schedule(steps)
    z = (
        sample_latents(
            model.denoiser,
            torch.randn(4, model.ae.latent, generator=g),
            steps - 1,
            sched,
            g,
        )
        * model.latent_scale
    )
    vecs = model.denormalise(model.ae.decode(z))
    subset = [unflatten_subset(v, model.names, model.shapes) for v in vecs]
    return [
        round(accuracy(model.classifier(model.pool_best | sub), images, labels), 4)
        for sub in subset
    ]


def load_feddiff(path: str | Path) -> FedDiffModel:
    """Load a folder written by ``build_feddiff``; ``FileNotFoundError`` says how
    to build one."""
    from safetensors.torch import load_file

    from common.models import load_classifier

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no FedDiff model at {path} (config.json missing); build it with "
            "`python -m bench pretrain --stage feddiff`"
        )
    cfg = json.loads((path / "config.json").read_text())
    st = cfg["settings"]
    ae = WeightAE(cfg["dim"], st["latent"], tuple(st["ae_channels"]))
    ae.load_state_dict(load_file(str(path / "autoencoder.safetensors")))
    den = LatentDenoiser(st["latent"], st["denoiser_channels"], st["denoiser_blocks"])
    den.load_state_dict(load_file(str(path / "denoiser.safetensors")))
    pool = load_file(str(path / "pool.safetensors"))
    best = load_classifier(path / "pool_best").state_dict()
    return FedDiffModel(
        config=cfg,
        ae=ae.eval(),
        denoiser=den.eval(),
        pool_mu=pool["pool_mu"],
        pool_acc=pool["pool_accuracy"],
        mean=pool["mean"],
        scale=float(cfg["scale"]),
        latent_scale=float(cfg["latent_scale"]),
        pool_best={k: v.detach().clone() for k, v in best.items()},
        proxy_images=pool["proxy_images"],
        proxy_labels=pool["proxy_labels"],
    )
