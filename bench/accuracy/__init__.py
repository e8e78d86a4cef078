"""``python -m bench accuracy``: accuracy of every one-shot method, over seeds.

The headline is the accuracy on the global test set (results.json's
``global_accuracy``): the dataset's test split in the domain of every client,
balanced over classes, as one-shot FL papers report it. The global model is
evaluated on it; for ``local``, each client's own model (mean over clients).
The mean accuracy on the clients' own held-out splits (which carry their label
skew and favour a model trained on their own data) is the second table.

Every federated method runs as the real Flower app in local simulation
(``flwr run . local``, see :mod:`bench.flower_runs`); the ``centralized`` oracle
is computed in-process: the same classifier trained on the union of all
clients' real training data and evaluated on the same global test set (the same
function, the same domains) and on each client's held-out split.

Outputs (``--out``, default ``bench-results/``): ``accuracy.json`` (every run,
the per-method summary, the FID-proxy), ``accuracy.md`` (tables) and
``accuracy.png`` (global accuracy with std error bars, global accuracy per domain).

The FID-proxy section measures the generator per client domain: the Fréchet
distance, in the judge classifier's feature space, between real images of the
domain and samples conditioned on an OSCAR upload of that domain (retrieval
and oracle captions), or on plain class-name prompts (the FGL baseline).

Modules: ``config`` (the methods and the worlds), ``records`` (one run's
results.json -> a record; aggregation over seeds), ``tables`` and ``report``
(Markdown, plot, files), ``oracle`` (the centralized model), ``fid`` (the
generator's FID-proxy per domain), ``cli`` (the command).
"""
