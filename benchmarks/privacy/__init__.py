"""Differential-privacy benchmark: privacy-utility, DP-SGD step cost, membership inference.

``python -m benchmarks.privacy [--out DIR] [--parts utility,cost]
[--docs docs/benchmarks.md]`` runs, on this machine's CPUs:

1. **Privacy-utility** — the same federation (5 IID sites, FedAvg, local DP-SGD with Opacus at
   each site) at ε ∈ {∞, 8, 3, 1} on MedNIST and PneumoniaMNIST; test AUC/accuracy of the
   final global model and the ε each site spent. Each federation is an ``fl-sim`` run
   (:func:`consilia.simulations.run.run_experiment`) whose Flower transport is the in-process
   grid (:mod:`consilia.simulations.inprocess`: same ServerApp, ClientApp and wire format,
   no Ray start-up per run).
2. **Membership inference** (:mod:`consilia.simulations.audits.membership_inference`) against
   the final global model of the ε ∈ {∞, 8, 3} runs: loss-threshold and LiRA attack AUCs
   (``privacy_audit.json`` in each run directory, shown by ``fl-report``).
3. **Step cost** — time and peak memory of one DP-SGD step vs a plain step, per registered
   model and grad-sample mode (1 thread, fixed batch, noise 1.0, clip 1.0).

One module per concept: :mod:`.recipe` (the federation every run shares), :mod:`.utility`
(1 + 2), :mod:`.central` (central-DP comparison runs), :mod:`.step_cost` (3),
:mod:`.markdown` (the report), :mod:`.docs_section` (``--docs``), ``__main__`` (the CLI).

Results: ``DIR/privacy_bench.json`` and ``DIR/privacy_bench.md``; ``--docs`` replaces the
``## Differential privacy`` section of that Markdown file with the new figures.
"""
