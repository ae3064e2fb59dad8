"""Neurons: which FFN neurons make a model do a task, and what zeroing them does.

* ``arithmetic``: Yu & Ananiadou's (2024) arithmetic neurons on two-digit addition — each neuron's share of its
  layer's log-probability increase of the answer (integrated gradients through the logit lens), and the ablation of
  the top neurons against as many random ones.

The addition problems themselves are task data: :mod:`mechfin_utils.tasks.addition`.
"""

from mechfin_utils.methods.neurons.arithmetic import (
    NeuronAttribution,
    ablation_summary,
    ablation_test,
    lens_log_prob,
    neuron_activations,
    neuron_attribution,
    zeroing_neurons,
)

__all__ = [
    "NeuronAttribution",
    "ablation_summary",
    "ablation_test",
    "lens_log_prob",
    "neuron_activations",
    "neuron_attribution",
    "zeroing_neurons",
]
