"""The core: what every method stands on.

* ``paths`` — the repository root, the data folder and the model cache;
* ``models`` — loading every model through TransformerLens's bridge (names, BOS decisions, offline GPT-2, the
  embedded SmolLM2; fine-tuned screeners are registered by ``mechfin_utils.screener``);
* ``hook_points`` — where in a Hugging Face model an analysis reads or writes (MLP keys, output projections, block
  outputs), weight snapshots restored bit for bit, padded forwards;
* ``functional`` — the models' own forward pass as tensor functions (GPT-2 and Llama families);
* ``engine`` — the one intervention engine (replace, ablate, restore, cut attention edges; patch graph edges);
* ``graph`` — the computational graph: senders, receivers (q/k/v separate) and every residual edge;
* ``head_labels`` — the one head-label format, ``"L10H7"``: :func:`head_label` writes it, :func:`parse_head` reads it;
* ``metrics``, ``stats``, ``inputs`` — the logit difference and its normalisation, bootstrap intervals, the one
  check of token-id arguments.
"""

from mechfin_utils.core.engine import BlockAttention, Replace, Segment, run, run_edges
from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.graph import ComputationalGraph
from mechfin_utils.core.metrics import NormalisedLogitDiff, logit_diff
from mechfin_utils.core.models import LoadedModel, load_model

__all__ = [
    "BlockAttention",
    "ComputationalGraph",
    "FunctionalTransformer",
    "LoadedModel",
    "NormalisedLogitDiff",
    "Replace",
    "Segment",
    "load_model",
    "logit_diff",
    "run",
    "run_edges",
]
