"""``hetfed bench``: the cost model of a simulated federation, measured side by side in one run.

Seven measurements, one module each (``hetfed bench --items 1,3`` picks some):

1. :mod:`.client_throughput` - client updates per second and peak memory of hetfed's ClientApp
   (one cached base model per process, adapters swapped) against the naive pattern of Flower's
   LLM examples (``naive_train``: the base model rebuilt from disk and wrapped by peft on
   every call), on the quickstart's clients, each variant in its own process.
2. :mod:`.overhead` - wall time of the training part of simulated rounds (the
   ``train_seconds`` of ``metrics.jsonl``, through ``hetfed run`` and Flower's Simulation Engine)
   against the sum of the bare local training steps of the same clients, as a ratio.
3. :mod:`.aggregation` - time and peak memory (tracemalloc) of every rank strategy's
   ``aggregate`` on 100 random client replies of SmolLM2-135M's shapes, and
   ``flexlora_large`` - FlexLoRA's factored SVD against the dense sum and full SVD on one
   transformer block of 7B-class shapes.
4. :mod:`.server_memory` - bytes the strategy holds after registering 500 and 5,000 clients
   (budget queries over :class:`.common.SimulatedNodes`), and the bytes per client between
   the two.
5. :mod:`.precision` - the time of local training steps under ``train.precision = "bf16"``
   and on a bfloat16 base against float32, for MiniLM (the scenario's classifier) and
   SmolLM2-135M (instruction task), the variants alternated in one process per model.
6. :mod:`.device_messages` - what one message (budget query, train) costs a deployed device:
   the time of each ClientApp process a SuperNode on loopback starts, and, with ``--baseline``,
   the same for the apps of another hetfed checkout.
7. :mod:`.packing` - client updates per second and peak memory of packed training
   (``simulation.packing``: k clients in one batched pass over one base) against one client per
   actor (each client trained alone, one after the other), on the same real train jobs, each
   variant in its own process, with the base copies each needs for k clients at once.

``--quick`` runs each with tiny sizes (the tiny random BERT, two local steps, a few clients,
small shapes): it checks that the machinery works and its figures mean nothing. The results are
printed as Markdown tables and written as JSON (``--out``, default ``results/bench/bench.json``),
after every item, so a long run keeps what it measured. ``docs/benchmarks.md`` reads them.

Run by :func:`tooling.bench.command.run_bench`.
"""

ITEMS = (1, 2, 3, 4, 5, 6, 7)
