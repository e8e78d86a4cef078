"""``python -m bench fleet``: the real one-shot round at 10, 100 and 1,000 clients.

Issue 22's scale benchmark. Per fleet size N, the real round (``server_app``)
runs in process over ``deploy.inprocess``'s Grid on a virtual clock, each round
in a fresh subprocess whose peak resident memory is the server's:

1. **the pool.** One subprocess runs the real ClientApp's collect for the P
   partitions of a P-way split of the run's dataset (default P = 10, the
   default Dirichlet partition of ``mnist-domains``) and records the replies.
   Every round replays them (``ReplayClient``): the device on partition ``p``
   answers with the recorded reply of partition ``p mod P``, its partition id
   and fleet size rewritten. Why a pool: flwr-datasets' Dirichlet partitioner
   (``min_partition_size=10``) gives up at 1,000 partitions of the 30,000-image
   client pool ("max number of attempts (10) was reached"); ``iid`` and
   ``domain`` split it, but 1,000 genuine clients cost 1,000 partition
   computations (~1 s each) and captioning passes on the server's CPU, and
   their memory would count as the server's. With P a multiple of the five
   domains, a replayed device keeps its partition's domain. The push-back
   evaluation is not replayed (it depends on the pushed model): a device
   answers it with its envelope and no accuracy; accuracy here is the
   server's, on the global test set.
2. **the fleet.** Devices connect uniformly over the first 70% of
   ``collect-window-s``; 10% never reply (silent), 5% reply 2-20 s after the
   window closes (late), the others 1 s to 20% of the window after they are
   asked. Every device takes 30-90 s to evaluate the pushed model, so the push
   phase outlasts the late replies: the round records late replies after its
   server work and again after the push phase, and on the virtual clock no
   time passes during the server work. ``collect-quiet-s=0`` and
   ``target-clients=0``: the window runs its full length.
3. **three rounds per N.** (a) uninterrupted, with ``synth-budget``: the costs
   (collect seconds per upload, server work, peak RSS), the fleet (late,
   missing) and the accuracy with the budget; (b) the same fleet, the server
   SIGKILLed once the journal holds about half the eventual uploads, then run
   again with the same ``run-name`` on a clock 30 s past the kill: uploads
   received (persisted by either process, counted in each), kept in the
   final journal, lost, and devices asked twice; (c) ``synth-budget=0`` where the
   requested images fit ``--max-unbudgeted``, else an estimate from (a)'s
   rates.

The budget is chosen so that N=10 already exceeds it: the server work is then
bounded by the same number of synthetic images at every N. ``--quick`` sets
``QUICK_KEYS`` (fewer examples per pool client, 5 sampler steps) and runs
``synth-budget=0`` up to 5,000 requested images (N=10 only). The bench exits 1
when a check fails: 0 uploads lost; no device asked twice; server work at the
largest N within 2x of the smallest; peak RSS at the largest N below 4 GB;
late and missing devices listed as such.

Writes ``<out>/fleet.json``, ``fleet.md`` and ``fleet.png``.

Modules: ``plan`` (the settings and the fleet), ``bench.replay`` (the pool of
genuine replies and the client that replays them), ``process`` (one round in
its own process), ``rounds`` (the three rounds of one size), ``core`` (the
sizes and the checks), ``report`` (files and summary), ``cli`` (the command).
"""
