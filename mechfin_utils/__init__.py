"""mechfin_utils: the tested code behind mechfin's notebooks, one subpackage per concept.

Layers, each importing only from those below it (checked by import-linter in ``make test``):

* ``tooling``: make figures / verify / bench / workshop, and test material;
* ``reporting``: figures, plots, tables, the notebook session, the offline site;
* ``methods`` (readout, patching, circuits, tracing, editing, neurons) and ``screener`` (the fine-tuned screener
  and behaviour), side by side;
* ``tasks``: every task set's loader, with the papers' claims;
* ``core``: loading models, the functional forward pass, the intervention engine, the graph, metrics, statistics.
"""

from mechfin_utils import screener as _screener  # noqa: F401  (registers the screeners with core.models.load_model)

__version__ = "0.1.0"
