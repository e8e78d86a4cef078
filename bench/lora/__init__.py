"""``python -m bench lora``: one-shot federated LoRA merges side by side.

Two worlds of concepts the embedded generator never saw (``--world``):

* ``shared`` (default; FedDDPM's setting, arXiv 2503.06426: non-IID clients of
  one new domain): every client's digits are upside-down, a transform
  pretraining never used, each client in its own rare style (inverted, thick,
  rotated, noisy) with Dirichlet label skew. A merge must carry the new domain
  to every client's style and classes.
* ``disjoint`` (multi-concept personalisation): each client holds a different
  unseen transform (``inverted+mirrored``, ``thick+upside-down``, ``thin+boxed``,
  ``rotated+small``). An average of updates keeps each concept at 1/N strength.

See ``common.mnist_domains.UNSEEN_TRANSFORMS``. Per seed, in-process and with the app's
own code paths:

1. every client fine-tunes a LoRA adapter on its data
   (``methods.lora.client_lora.train_client_lora``, as the ClientApp does) and uploads it
   with its per-class caption embeddings (fp16, bytes counted);
2. the server validates the uploads (``methods.lora.server_lora.Lora.validate``);
3. for each variant it gets one adapter per client: ``none`` (the base
   generator), each merge of ``Lora.merge`` (``fedavg``, ``stack``, ``svd``,
   ``ties``, ``dare``, ``generative``), or ``own`` (each client's own adapter:
   the reference a merge tries to keep);
4. it samples ``images-per-class`` images per (client, class) from the client's
   caption embeddings with that adapter (``methods.steps.synthesize_set``):
   the **FID-proxy** of each client's samples against the client's held-out
   images (judge features), and the **downstream accuracy** of the global
   classifier trained on all clients' samples (``train_global``) on every
   client's held-out split, averaged over ``--probes`` classifier inits (a
   steadier probe of the samples than one training run).

Outputs (``--out``): ``lora.json`` (every record, the summary), ``lora.md`` and
``lora.png``; all three are rewritten after each seed.

Modules: ``world`` (the worlds, variants and settings), ``runner`` (one seed),
``summary`` (over seeds, the checks), ``report`` (tables, plot, files),
``cli`` (the command).
"""
