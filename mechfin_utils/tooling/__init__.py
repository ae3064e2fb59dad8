"""Tooling: the commands that run, check and time the notebooks, and test material. The top layer; nothing imports it
but the tests, the notebooks' workshop checker and the commands themselves.

Entry points (``python -m mechfin_utils.tooling.<name>``, called by the Makefile):

* ``run_figures`` (``make figures``): runs notebooks with papermill for one or more models and writes each model's
  ``figures/<model>/manifest.json``; ``staging`` is how one notebook runs in a process and a folder of its own and
  lands in ``figures/`` whole, only once it has finished;
* ``verify`` (``make verify``): reruns the notebooks and compares every number with the committed results;
* ``workshop`` (``make workshop``): the exercise notebooks, made from tagged notebook cells, and the checker they call;
* ``bench`` (``make bench``, a package): mechfin's patching, causal tracing and edge scoring timed against
  TransformerLens, a ROME-style tracer and exact per-edge patching.

Beside them, ``testing``: a GPT-2-shape model with random weights in a Hugging Face layout, and the rounding
tolerance the tests use. Nothing is imported here, so that a command loads only what it needs
(``python -m mechfin_utils.tooling.verify --fresh DIR`` runs no notebook and imports neither papermill's runner nor
the bench).
"""
