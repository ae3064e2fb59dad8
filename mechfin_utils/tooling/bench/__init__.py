"""``make bench``: mechfin's methods timed against the reference implementations, on the same model, prompts and
metric, in one process, with the same numbers checked.

Four tables, one module each:

* ``patching_vs_transformer_lens``: exact activation patching against TransformerLens's ``get_act_patch_*`` (its time
  measured on a sample of cells and scaled; ``--full-tl`` runs every cell);
* ``tracing_vs_rome``: causal tracing against a ROME-style tracer (one hooked forward pass per restored state);
* ``edge_scoring``: EAP and EAP-IG over every edge against exact patching of each edge (timed on a sample, scaled);
* ``behaviour_scoring``: scoring prompts of any length in padded batches against the earlier exact-length groups.

Each row also gives the peak memory and how far the time is from the **FLOP floor**, the arithmetic no exact method
can avoid, at the matrix-multiply throughput measured on this machine (``flop_floor``, ``machine``). ``command`` is
the command line (``python -m mechfin_utils.tooling.bench --help``); results go to stdout and
``bench/results/latest.md`` + ``latest.json``.
"""
