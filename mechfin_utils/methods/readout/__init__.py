"""Readout: what a model's activations and weights say directly, read at the answer position, without intervening.

* ``attention`` -- where heads read from: patterns, and the answer position's attention to a phrase;
* ``dla`` -- direct logit attribution: each layer's and each head's exact share of the logit difference, and the
  logit-difference lens; ``heads`` -- heads by name (``"L10H7"``), parsed, selected and ranked;
* projection to the vocabulary: ``token_lens`` (the logit lens read as tokens), ``ffn_neurons`` (value vectors as
  token lists, Geva et al. 2020), ``ffn_updates`` (what a layer's update promotes, Geva et al. 2022),
  ``embedding_circuits`` (OV and QK circuits as token-to-token maps, Dar et al. 2023), ``vocabulary`` (token sets);
* ``task_sets`` -- any of these over a task set's batches; ``final_position`` and ``unembedding`` -- what they share.

The tables of means with bootstrap intervals built on these are :mod:`mechfin_utils.reporting.readout_tables`.
(The function ``unembedding`` is not exported here: the name is its module's, ``readout.unembedding``.)
"""

from mechfin_utils.methods.readout.attention import (
    attention_patterns,
    attention_to_positions,
    circuitsvis_html,
    final_position_attention_by_token,
    phrase_attention,
    phrase_token_positions,
    top_attended_tokens,
)
from mechfin_utils.methods.readout.dla import (
    HeadAttribution,
    accumulated_from_components,
    head_attribution,
    layer_decomposition,
    layer_totals,
    logit_lens,
    over_batches,
    term_groups,
)
from mechfin_utils.methods.readout.embedding_circuits import (
    ov_answer_push_by_group,
    ov_answer_scores,
    ov_circuit_top_pairs,
    ov_top_outputs,
    qk_circuit_top_pairs,
)
from mechfin_utils.methods.readout.ffn_neurons import (
    coherence_against_baseline,
    mlp_activations_last,
    neuron_scores,
    neuron_token_coherence,
    neuron_value_tokens,
    random_neuron_coherence,
    random_token_coherence,
    top_neurons,
)
from mechfin_utils.methods.readout.ffn_updates import (
    fraction_in_token_set,
    mlp_answer_contributions,
    mlp_update_top_tokens,
)
from mechfin_utils.methods.readout.final_position import run_with_final_position_cache
from mechfin_utils.methods.readout.heads import head_label, head_labels, parse_head, select_heads, top_heads
from mechfin_utils.methods.readout.task_sets import collect_over_batches, lens_and_mlp_readout, pair_value_frame
from mechfin_utils.methods.readout.token_lens import (
    answer_rank_bands,
    logit_lens_agreement,
    logit_lens_agreement_by_prompt,
    logit_lens_tokens,
    logit_lens_trajectories,
)
from mechfin_utils.methods.readout.unembedding import decode_each, single_token_ids
from mechfin_utils.methods.readout.vocabulary import (
    frequent_token_ids,
    phrase_vocabulary,
    prompt_word_ids,
    token_set_ids,
)

__all__ = [
    # attention
    "attention_patterns",
    "attention_to_positions",
    "circuitsvis_html",
    "final_position_attention_by_token",
    "phrase_attention",
    "phrase_token_positions",
    "top_attended_tokens",
    # direct logit attribution and heads
    "HeadAttribution",
    "accumulated_from_components",
    "head_attribution",
    "layer_decomposition",
    "layer_totals",
    "logit_lens",
    "over_batches",
    "term_groups",
    "head_label",
    "head_labels",
    "parse_head",
    "select_heads",
    "top_heads",
    # projection to the vocabulary
    "answer_rank_bands",
    "logit_lens_agreement",
    "logit_lens_agreement_by_prompt",
    "logit_lens_tokens",
    "logit_lens_trajectories",
    "coherence_against_baseline",
    "mlp_activations_last",
    "neuron_scores",
    "neuron_token_coherence",
    "neuron_value_tokens",
    "random_neuron_coherence",
    "random_token_coherence",
    "top_neurons",
    "fraction_in_token_set",
    "mlp_answer_contributions",
    "mlp_update_top_tokens",
    "ov_answer_push_by_group",
    "ov_answer_scores",
    "ov_circuit_top_pairs",
    "ov_top_outputs",
    "qk_circuit_top_pairs",
    "frequent_token_ids",
    "phrase_vocabulary",
    "prompt_word_ids",
    "token_set_ids",
    # over a task set, and shared pieces
    "collect_over_batches",
    "lens_and_mlp_readout",
    "pair_value_frame",
    "run_with_final_position_cache",
    "decode_each",
    "single_token_ids",
]
