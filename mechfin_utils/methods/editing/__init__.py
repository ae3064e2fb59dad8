"""Knowledge editing: write a new fact into a model's MLP weights, and score what the edit changed.

* ``edits``: ROME's rank-one update, MEMIT's batch update over a range of layers, and the fine-tuning baseline
  (FT-L), all on the MLP's output matrix;
* ``locate``: which layer to edit, with its margin over the runner-up (:func:`choose_layer`);
* ``key_statistics``: the keys' second moment ``C = E[k kᵀ]`` the updates are measured in, over text the model
  writes itself;
* ``convergence``: whether an edit moves when the covariance's corpus or the context templates grow
  (:func:`edit_convergence`);
* ``evaluation``: CounterFact's efficacy, generalisation, specificity and fluency, with bootstrap intervals.

The requests come from :mod:`mechfin_utils.tasks.counterfact`; where an edit reads and writes, and how weights are
saved and restored bit for bit, from :mod:`mechfin_utils.core.hook_points` (re-exported here: ``snapshot``,
``restoring``, ``output_matrix``, ...).
"""

from mechfin_utils.core.hook_points import (
    EditSite,
    WeightSnapshot,
    edit_site,
    next_token_logits,
    output_matrix,
    output_projection,
    restoring,
    restoring_site,
    snapshot,
)
from mechfin_utils.methods.editing.convergence import EditConvergence, convergence_summary, edit_convergence
from mechfin_utils.methods.editing.edits import (
    MEMIT_PRIOR_WEIGHT,
    MemitEdit,
    RomeEdit,
    ValueParams,
    ValueResult,
    context_prefixes,
    fine_tune,
    memit,
    memit_targets,
    optimise_value,
    rank_one_update,
    reapply,
    rome,
    subject_key,
)
from mechfin_utils.methods.editing.evaluation import (
    METRICS,
    answer_log_probs,
    evaluate_edit,
    generate_greedy,
    ngram_entropy,
    summarise,
)
from mechfin_utils.methods.editing.key_statistics import (
    KeyCovariance,
    covariance_convergence,
    key_covariance,
    layer_prefix_covariances,
    prefix_covariances,
    prefix_sizes,
    self_generated_corpus,
)
from mechfin_utils.methods.editing.locate import LayerChoice, choose_layer

__all__ = [
    "MEMIT_PRIOR_WEIGHT",
    "EditSite",
    "edit_site",
    "restoring_site",
    "METRICS",
    "KeyCovariance",
    "LayerChoice",
    "MemitEdit",
    "RomeEdit",
    "EditConvergence",
    "ValueParams",
    "ValueResult",
    "WeightSnapshot",
    "answer_log_probs",
    "choose_layer",
    "context_prefixes",
    "convergence_summary",
    "covariance_convergence",
    "edit_convergence",
    "evaluate_edit",
    "fine_tune",
    "generate_greedy",
    "key_covariance",
    "layer_prefix_covariances",
    "memit",
    "memit_targets",
    "next_token_logits",
    "ngram_entropy",
    "optimise_value",
    "output_matrix",
    "output_projection",
    "prefix_covariances",
    "prefix_sizes",
    "rank_one_update",
    "reapply",
    "restoring",
    "rome",
    "self_generated_corpus",
    "snapshot",
    "subject_key",
    "summarise",
]
