"""``python -m bench synth``: the synthesis engine against diffusers, side by side.

Parts (``--parts``; the default runs the first three):

* ``pipeline``: img/s of the engine (``common.synthesis.sample``) and of diffusers'
  ``StableDiffusionPipeline`` on the same modules, prompt embeddings, DDIM steps,
  guidance and batch, alternated in one run (the ratio is the figure: absolute
  times drift on shared machines). Both start from the same per-image initial
  latents, so their images are compared too (max abs difference). On a CPU: a
  tiny SD-format model (batch 16, 20 steps) and the SD-1.5 architecture at
  64 px (batch 4, 8 steps), random weights built from configs. With
  ``--device cuda``: SD-1.5 at 512 px, DDIM 25, CFG 7.5, the engine with
  ``batch_size="auto"`` (eager, and compiled with ``--compile``), peak memory
  of both, and the 18.7 img/s compute floor of an H100 for reference.
* ``workers``: the same job (embedded generator) on 1 and 2 Ray workers
  (``--workers``), img/s and the max abs difference to one process.
* ``quality``: the default sampler setting against faster ones (DPM-Solver++,
  fewer steps, guidance cut-off) on the embedded stack, through the app's own
  client and server code in-process: images/s, FID-proxy to each client's
  held-out images, and the accuracy of the global classifier, over seeds with
  paired differences.

* ``cpu-batch``: the engine's img/s on the CPU at several denoising batch sizes
  (``--batches``), alternated in one run: the figure behind ``CPU_AUTO_BATCH``.

Modules: ``pipeline``, ``workers``, ``quality`` and ``cpu_batch`` (the parts),
``report`` (synth.md, synth.json), ``cli`` (the command).
"""
