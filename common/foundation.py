"""Foundation models: text encoder, captioner and text-conditioned generator.

Every role is named by ``"embedded"`` (the small stack that ships inside this
package), a local folder, or a Hugging Face hub id, and is always loaded with
``from_pretrained`` — the embedded stack takes the very same code path as
Stable Diffusion / CLIP / BLIP from the hub.

Embedded layout (``common/embedded/``)::

    clip/        CLIPModel (transformers) + tokenizer      -> text-encoder, captioner
    generator/   unet/ (UNet2DConditionModel), scheduler/, conditioning.json
    judge/       classifier trained on the public split   -> FID-proxy, sanity tests

``conditioning.json`` says how the generator is conditioned: ``{"embedding":
"pooled"}`` means one token per prompt, the L2-normalised projected CLIP text
embedding (what OSCAR clients upload, 2 bytes x projection_dim per class);
Stable Diffusion checkpoints need ``"sequence"`` (the 77 x 768 hidden states).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EMBEDDED = "embedded"
EMBEDDED_ENV = "ONESHOT_EMBEDDED_DIR"
SCHEDULERS = ("ddim", "ddpm", "dpm", "euler", "default")
EMBEDDINGS = ("pooled", "sequence")

# ---------------------------------------------------------------- locating weights


def embedded_dir() -> Path:
    """Folder of the embedded stack.

    The Flower app bundle carries code only, so the weights are looked up in the
    *installed* package (every ``sys.path`` entry), not next to this file.
    """
    env = os.environ.get(EMBEDDED_ENV)
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parent / "embedded"]
    candidates += [Path(p) / "common" / "embedded" for p in sys.path if p]
    for c in candidates:
        if (c / "clip" / "model.safetensors").is_file():
            return c
    raise FileNotFoundError(
        "The embedded foundation stack (common/embedded/) was not found in any of: "
        + ", ".join(str(c) for c in candidates[:4])
        + ". Install the project (`pip install -e .`), rebuild it with "
        "`python -m bench pretrain`, or set ONESHOT_EMBEDDED_DIR."
    )


def resolve_model(name: str, role: str, component: str) -> str:
    """Map a role's value to something ``from_pretrained`` accepts."""
    if name == EMBEDDED:
        return str(embedded_dir() / component)
    return os.path.expanduser(name)


def _load(cls: Any, name: str, role: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with an error that names the role and the fix."""
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        where = Path(name)
        looked = (
            f"local folder {where.resolve()}"
            if where.exists() or name.startswith((".", "/", "~"))
            else f"the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')})"
        )
        sub = f" (subfolder {kwargs['subfolder']!r})" if "subfolder" in kwargs else ""
        raise FileNotFoundError(
            f"{role}={name!r}{sub}: could not load {cls.__name__} weights from {looked}: "
            f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "This machine may have no access to the hub: download the model elsewhere "
            f"(`huggingface-cli download {name}`) and set {role} to its local folder, "
            f"or use {role}='embedded'."
        ) from e


# ---------------------------------------------------------------- building (pretraining, tests)


def build_tokenizer(words: list[str], max_length: int = 16) -> Any:
    """A word-level tokenizer in HF format (``<bos> words <eos>``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def build_clip(
    vocab_size: int,
    *,
    image_size: int = 16,
    channels: int = 1,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    patch_size: int = 4,
    max_length: int = 16,
) -> Any:
    """A small dual encoder in the transformers CLIP format (random weights)."""
    from transformers import CLIPConfig, CLIPModel

    # eos_token_id != 2 so CLIP pools at the <eos> token (2 is transformers' legacy value).
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    return CLIPModel(
        CLIPConfig(
            text_config=text, vision_config=vision, projection_dim=projection_dim
        )
    )


def build_generator(
    *,
    image_size: int = 16,
    channels: int = 1,
    cond_dim: int = 64,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    num_train_timesteps: int = 1000,
) -> tuple[Any, Any]:
    """A pixel-space text-conditioned UNet + DDPM scheduler (random weights)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    n = len(block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cond_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
    )
    return unet, scheduler


def save_generator(
    path: str | Path, unet: Any, scheduler: Any, embedding: str = "pooled"
) -> None:
    """Save in the diffusers folder layout (``unet/``, ``scheduler/``) + conditioning."""
    path = Path(path)
    unet.save_pretrained(path / "unet")
    scheduler.save_pretrained(path / "scheduler")
    (path / "conditioning.json").write_text(
        json.dumps({"embedding": embedding}, indent=2)
    )


# ---------------------------------------------------------------- text encoder


@dataclass
class TextEncoder:
    """CLIP text tower: prompts -> conditioning ``[N, L, D]`` (L = 1 when pooled)."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def max_length(self) -> int:
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(
            min(self.tokenizer.model_max_length, text_cfg.max_position_embeddings)
        )

    @torch.no_grad()
    def encode(
        self, texts: list[str], kind: str = "pooled", batch_size: int = 256
    ) -> torch.Tensor:
        if kind not in EMBEDDINGS:
            raise ValueError(
                f"embedding={kind!r} is not one of {', '.join(EMBEDDINGS)}"
            )
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size],
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            if kind == "pooled":
                if hasattr(self.model, "get_text_features"):
                    emb = self.model.get_text_features(**batch)
                    emb = getattr(emb, "pooler_output", emb)
                else:  # CLIPTextModel(WithProjection) from an SD checkpoint
                    o = self.model(**batch)
                    emb = getattr(o, "text_embeds", None)
                    emb = o.pooler_output if emb is None else emb
                emb = F.normalize(emb.float(), dim=-1)[:, None, :]
            else:
                tm = getattr(self.model, "text_model", self.model)
                emb = tm(**batch).last_hidden_state.float()
            out.append(emb.cpu())
        return torch.cat(out)


def load_text_encoder(
    name: str = EMBEDDED,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Load a CLIP text encoder: a CLIPModel folder, or an SD ``text_encoder`` subfolder."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPModel,
        CLIPTextModelWithProjection,
    )

    path = resolve_model(name, "text-encoder", "clip")
    sub: dict[str, str] = {}
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        sub = {"subfolder": "text_encoder"}  # a diffusers pipeline folder / hub id
        cfg = _load(AutoConfig, path, "text-encoder", **sub)
    if cfg.model_type == "clip":
        model = _load(CLIPModel, path, "text-encoder", **sub)
    else:
        model = _load(CLIPTextModelWithProjection, path, "text-encoder", **sub)
    tok_sub = {"subfolder": "tokenizer"} if sub else {}
    tokenizer = _load(AutoTokenizer, path, "text-encoder", **tok_sub)
    model = model.to(device=device, dtype=dtype).eval()
    return TextEncoder(
        model=model, tokenizer=tokenizer, name=name, device=torch.device(device)
    )


# ---------------------------------------------------------------- captioning


def prepare_pixels(
    images: torch.Tensor, model: Any, processor_cfg: dict | None
) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> the pixel format a CLIP vision tower expects."""
    vcfg = model.config.vision_config
    x = images.float()
    if x.shape[1] != vcfg.num_channels:
        x = x.mean(1, keepdim=True).expand(-1, vcfg.num_channels, -1, -1)
    if x.shape[-1] != vcfg.image_size:
        x = F.interpolate(x, size=(vcfg.image_size, vcfg.image_size), mode="bicubic")
    if processor_cfg:  # a hub CLIP: [0, 1] then its mean/std
        mean = torch.tensor(processor_cfg.get("image_mean", [0.5] * 3))[
            : vcfg.num_channels
        ]
        std = torch.tensor(processor_cfg.get("image_std", [0.5] * 3))[
            : vcfg.num_channels
        ]
        x = ((x + 1) / 2 - mean[:, None, None]) / std[:, None, None]
    return x


@dataclass
class RetrievalCaptioner:
    """Caption an image by the phrase-bank entry closest to it in CLIP space.

    The cheap alternative to a captioning network on edge devices: one image
    forward pass and a dot product with text embeddings computed once. With
    ``labels`` given, only captions of the image's own class compete (the client
    knows its labels; this leaves retrieval to pick the style).
    """

    model: Any
    bank_texts: list[str]
    bank_labels: torch.Tensor
    bank_embeds: torch.Tensor  # [M, D], unit norm
    processor_cfg: dict | None = None

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 512,
    ) -> list[str]:
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            px = prepare_pixels(
                images[i : i + batch_size], self.model, self.processor_cfg
            )
            emb = self.model.get_image_features(pixel_values=px.to(self.model.dtype))
            emb = F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1)
            sim = emb @ self.bank_embeds.T
            if labels is not None:
                same = labels[i : i + batch_size, None] == self.bank_labels[None, :]
                sim = sim.masked_fill(~same, float("-inf"))
            out += [self.bank_texts[j] for j in sim.argmax(1).tolist()]
        return out


@dataclass
class GenerativeCaptioner:
    """A captioning network (e.g. BLIP) from the hub or a local folder."""

    model: Any
    processor: Any
    max_new_tokens: int = 20

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 16,
    ) -> list[str]:
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            x = (
                ((images[i : i + batch_size].float() + 1) * 127.5)
                .clamp(0, 255)
                .to(torch.uint8)
            )
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            inputs = self.processor(images=list(x), return_tensors="pt")
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            out += self.processor.batch_decode(ids, skip_special_tokens=True)
        return out


def load_captioner(
    name: str,
    bank_texts: list[str],
    bank_labels: torch.Tensor,
    device: torch.device | str = "cpu",
) -> RetrievalCaptioner | GenerativeCaptioner:
    """CLIP checkpoints caption by retrieval over ``bank_texts``; BLIP-like ones generate."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer, CLIPModel

    path = resolve_model(name, "captioner", "clip")
    cfg = _load(AutoConfig, path, "captioner")
    if cfg.model_type == "clip":
        model = _load(CLIPModel, path, "captioner").to(device).eval()
        tokenizer = _load(AutoTokenizer, path, "captioner")
        enc = TextEncoder(
            model=model, tokenizer=tokenizer, name=name, device=torch.device(device)
        )
        bank = enc.encode(bank_texts, "pooled")[:, 0, :]
        proc_file = Path(path) / "preprocessor_config.json"
        proc = json.loads(proc_file.read_text()) if proc_file.is_file() else None
        if proc is None and not Path(path).exists():
            proc = {
                "image_mean": [0.4815, 0.4578, 0.4082],
                "image_std": [0.2686, 0.2613, 0.2758],
            }
        return RetrievalCaptioner(
            model, list(bank_texts), bank_labels.clone(), bank, proc
        )
    from transformers import AutoModelForImageTextToText

    model = _load(AutoModelForImageTextToText, path, "captioner").to(device).eval()
    processor = _load(AutoProcessor, path, "captioner")
    return GenerativeCaptioner(model, processor)


# ---------------------------------------------------------------- generator


@dataclass
class Generator:
    """Text-conditioned diffusion sampler (pixel space, or latent with a VAE)."""

    unet: Any
    scheduler: Any
    vae: Any | None
    embedding: str
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def cond_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def check_inputs(self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                     num_inference_steps: int) -> None:  # fmt: skip
        if cond.ndim != 3 or cond.shape[-1] != self.cond_dim:
            raise ValueError(
                f"conditioning has shape {tuple(cond.shape)}; generator {self.name!r} needs "
                f"[batch, tokens, {self.cond_dim}] (embedding={self.embedding!r})"
            )
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(
                f"unconditional embedding {tuple(uncond.shape)} does not match "
                f"conditioning {tuple(cond.shape)}"
            )
        if guidance_scale < 1.0:
            raise ValueError(f"guidance-scale={guidance_scale} must be >= 1")
        if num_inference_steps < 1:
            raise ValueError(f"num-inference-steps={num_inference_steps} must be >= 1")

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        *,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 20,
        seed: int = 0,
        batch_size: int = 256,
        progress: Any = None,
    ) -> torch.Tensor:
        """Sample one image per row of ``cond`` ``[N, L, D]``; returns ``[N, C, H, W]`` in [-1, 1].

        ``progress`` is an optional callable ``(n_done)`` for progress bars.
        """
        # 1. Check inputs
        self.check_inputs(cond, uncond, guidance_scale, num_inference_steps)
        g = torch.Generator().manual_seed(seed)
        cfg = self.unet.config
        images = []
        for start in range(0, len(cond), batch_size):
            c = cond[start : start + batch_size].to(self.device, self.dtype)
            b = len(c)
            # 2. Prepare timesteps
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            # 3. Prepare initial noise x_T ~ N(0, I)
            shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
            x = torch.randn(shape, generator=g).to(self.device, self.dtype)
            x = x * self.scheduler.init_noise_sigma
            guided = guidance_scale != 1.0
            u = uncond.to(self.device, self.dtype).expand(b, -1, -1)
            ctx = torch.cat([u, c]) if guided else c
            # 4. Denoising loop with classifier-free guidance (Ho & Salimans 2022):
            #    eps = eps(x, 0) + w * (eps(x, c) - eps(x, 0)); at w = 1 that is
            #    eps(x, c), so the unconditional half is skipped.
            for t in self.scheduler.timesteps:
                xin = torch.cat([x, x]) if guided else x
                xin = self.scheduler.scale_model_input(xin, t)
                eps = self.unet(xin, t, encoder_hidden_states=ctx).sample
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                x = self.scheduler.step(eps, t, x).prev_sample
            # 5. Decode latents (latent diffusion) and clamp to [-1, 1]
            if self.vae is not None:
                x = self.vae.decode(x / self.vae.config.scaling_factor).sample
            images.append(x.float().clamp(-1, 1).cpu())
            if progress is not None:
                progress(b)
        return torch.cat(images) if images else torch.empty(0)


def make_scheduler(base: Any, name: str) -> Any:
    """A sampling scheduler built from the checkpoint's training scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    table = {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if name == "default":
        return base
    if name not in table:
        raise ValueError(f"scheduler={name!r} is not one of {', '.join(SCHEDULERS)}")
    return table[name].from_config(base.config)


def load_generator(
    name: str = EMBEDDED,
    scheduler: str = "ddim",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Generator:
    """Load ``unet/``, ``scheduler/`` and (if present) ``vae/`` of a diffusers folder/hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = resolve_model(name, "generator", "generator")
    unet = _load(UNet2DConditionModel, path, "generator", subfolder="unet")
    base = _load(DDPMScheduler, path, "generator", subfolder="scheduler")
    vae = None
    local = Path(path)
    has_vae = (local / "vae").is_dir() if local.exists() else True
    if has_vae:
        vae = (
            _load(AutoencoderKL, path, "generator", subfolder="vae")
            .to(device, dtype)
            .eval()
        )
    cond_file = local / "conditioning.json"
    embedding = (
        json.loads(cond_file.read_text()).get("embedding", "pooled")
        if cond_file.is_file()
        else "sequence"  # Stable Diffusion checkpoints attend to the token sequence
    )
    return Generator(
        unet=unet.to(device, dtype).eval(),
        scheduler=make_scheduler(base, scheduler),
        vae=vae,
        embedding=embedding,
        name=name,
        device=torch.device(device),
        dtype=dtype,
    )


def to_dataset_format(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Resize / convert generated images to the clients' image format."""
    x = images.float()
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(-1, 1)


def generator_fingerprint(unet: Any) -> str:
    """Identity of a base generator: its config, parameter shapes and a weight checksum.

    An adapter trained on another base model carries another fingerprint.
    """
    import hashlib

    h = hashlib.sha256(
        json.dumps(dict(unet.config), sort_keys=True, default=str).encode()
    )
    for name, p in unet.named_parameters():
        if "lora_" in name:
            continue
        h.update(f"{name}:{tuple(p.shape)}".encode())
    first = next(p for n, p in unet.named_parameters() if "lora_" not in n)
    h.update(f"{float(first.detach().double().abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]
