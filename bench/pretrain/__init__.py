"""``python -m bench pretrain``: build the embedded foundation stack from public data.

The stack that ships in ``common/embedded/`` plays the roles that CLIP, BLIP and
Stable Diffusion play in OSCAR (Zeng et al. 2024, "One-Shot Collaborative Data
Distillation", arXiv 2408.02266), scaled to a 2-core CPU:

1. the public split (MNIST train[:30000], plain style dominant, five rare styles)
   is captioned with templates that name the class and, for rare styles, the style;
2. a dual encoder (transformers ``CLIPModel``) is trained contrastively with
   multi-positive targets (every pair with the same class and style is positive);
3. a pixel-space ``UNet2DConditionModel`` is trained with the DDPM epsilon loss
   (Ho et al. 2020), conditioned on ONE token: the frozen CLIP's pooled, unit-norm
   text embedding, or - like an OSCAR client's upload - the plain mean of several
   caption embeddings of the same class and style; 10% condition dropout enables
   classifier-free guidance (Ho & Salimans 2022);
4. a small CNN "judge" is trained on the public split (FID-proxy features, checks);
5. everything is evaluated and a model card is written.

Every stage is seeded; the same command on the same machine gives the same weights.

Modules: ``data`` (schedule, captions, sampling), ``clip`` (stage 2),
``generator`` (stage 3), ``stages`` (stages 2-4 and FedDiff's folder),
``evaluate`` and ``card`` (stage 5), ``cli`` (the command).
"""

import os

# With other processes on the 2 cores, OpenMP's default spin-waiting makes a 2-thread
# step ~10x slower than 1 thread (measured); passive waiting removes that. It only
# takes effect if set before torch is first imported, hence in the package's
# __init__, which runs before any of its modules imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
