"""Arithmetic neurons (Yu & Ananiadou 2024): which heads and which FFN neurons make a model add?

Yu & Ananiadou trace a model's arithmetic to a few attention heads, which move the operands to the last position,
and to FFN neurons there, which raise the answer's probability. Their neuron measure is the *log-probability
increase*: read the residual stream through the unembedding (the logit lens) before and after a component, and ask
how much more likely the answer becomes. This module follows that design on two-digit addition:

1. **Task** (:mod:`mechfin_utils.tasks.addition`): ``"a + b = "`` after five solved examples, two-digit ``a`` and
   ``b`` with a two-digit sum, kept only where the model answers exactly (``addition_problems``).
2. **Heads** (``addition_task`` + :class:`mechfin_utils.methods.circuits.nodes.NodeAblator`): each head's output
   is replaced by its output on a prompt with another first operand whose sum has another first answer token; the
   drop of the normalised logit difference (clean answer - corrupted answer) is the head's importance.
3. **Neurons** (:func:`neuron_attribution`): at the last position, layer ``l``'s MLP moves the stream from ``h``
   (entering the MLP) to ``h + sum_i m_i v_i (+ b)``, where ``m_i`` is neuron ``i``'s activation and ``v_i`` its
   row of the output matrix. The layer's **log-probability increase** is ``log p(answer | h + mlp) - log p(answer |
   h)`` through the logit lens. Each neuron's share is ``m_i v_i . g``, with ``g`` the gradient of the lens
   log-probability averaged along the straight line from ``h`` to ``h + mlp`` (integrated gradients): the shares
   and the bias term add up to the layer's increase exactly in the limit of many steps (tested), unlike scoring
   each neuron alone, which double-counts through the softmax.
4. **Ablation** (:func:`ablation_test`): zero the top neurons' activations at the last position, and as many
   random neurons from the same layers (seeded draws), and compare the answer's log-probability and accuracy.

Neuron activations are read and zeroed at the input of each MLP's output projection, the hook point
:func:`mechfin_utils.core.hook_points.key_point` (the same place ROME reads its keys).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechfin_utils.core.functional import FunctionalTransformer
from mechfin_utils.core.hook_points import key_point
from mechfin_utils.tasks.addition import AdditionProblem, groups_by_length

# ---------------------------------------------------------------------------------------------------------
# 3. Neurons: activations and their shares of a layer's log-probability increase
# ---------------------------------------------------------------------------------------------------------


def neuron_activations(
    fm: FunctionalTransformer, layer: int, resid_mid: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_mlp"]:
    """The MLP's neuron activations for the stream entering it: ``act(W_in x)`` (GPT-2) or ``act(W_gate x) * (W_up x)``
    (Llama), after the block's second norm; ``activations @ W_out (+ b_out)`` is the MLP's output."""
    w = fm.layers[layer]
    normed = fm.norm(resid_mid, w.ln2_w, w.ln2_b)
    up = normed @ w.W_in if w.b_in is None else normed @ w.W_in + w.b_in
    if w.W_gate is None:
        return fm.act(up)
    gate = normed @ w.W_gate if w.b_gate is None else normed @ w.W_gate + w.b_gate
    return fm.act(gate) * up


def lens_log_prob(
    fm: FunctionalTransformer, resid: Float[Tensor, "n d_model"], answer: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """``log p(answer)`` reading the residual stream ``resid`` through the final norm and the unembedding."""
    return torch.log_softmax(fm.unembed(fm.final_norm(resid)), dim=-1).gather(-1, answer[:, None])[:, 0]


@dataclass
class NeuronAttribution:
    """Per layer and problem: each neuron's share of the layer's log-probability increase of the first answer token
    at the last position, the output bias's share, and the increase itself (exact, through the logit lens)."""

    model_name: str
    ids: list[str]
    layers: list[int]  # the layers measured, in order (axis 0 below)
    neurons: Float[Tensor, "layer n d_mlp"]
    bias: Float[Tensor, "layer n"]
    increase: Float[Tensor, "layer n"]
    steps: int

    @property
    def mean(self) -> Float[Tensor, "layer d_mlp"]:
        return self.neurons.mean(1)

    def completeness_gap(self) -> float:
        """Largest ``|sum of shares + bias - increase|`` over layers and problems (quadrature error)."""
        return float((self.neurons.sum(-1) + self.bias - self.increase).abs().max())

    def top(self, k: int, layers: Sequence[int] | None = None) -> pd.DataFrame:
        """The ``k`` neurons with the largest mean share (layer, neuron, mean share, share of problems it helps),
        among ``layers`` (all when None)."""
        mean = self.mean.clone()
        if layers is not None:
            mean[[i for i, layer in enumerate(self.layers) if layer not in set(layers)]] = float("-inf")
        flat = mean.flatten().topk(k).indices
        d_mlp = mean.shape[1]
        rows = [(int(i) // d_mlp, int(i) % d_mlp) for i in flat]  # (row of self.layers, neuron)
        return pd.DataFrame(
            {
                "layer": [self.layers[row] for row, _ in rows],
                "neuron": [neuron for _, neuron in rows],
                "mean_log_prob_increase": [float(mean[row, neuron]) for row, neuron in rows],
                "share_of_problems_positive": [
                    float((self.neurons[row, :, neuron] > 0).float().mean()) for row, neuron in rows
                ],
            }
        )


def neuron_attribution(
    model, problems: Sequence[AdditionProblem], steps: int = 8, layers: Sequence[int] | None = None
) -> NeuronAttribution:
    """Every neuron's integrated-gradients share of its layer's log-probability increase (see the module docstring),
    at the last prompt position, for the first answer token; for ``layers`` (all when None)."""
    fm = FunctionalTransformer.from_model(model)
    layers = list(range(fm.n_layers)) if layers is None else sorted(set(layers))
    if not layers or not all(0 <= layer < fm.n_layers for layer in layers):
        raise ValueError(f"layers must be in [0, {fm.n_layers}), got {layers}")
    alphas = [(k + 0.5) / steps for k in range(steps)]
    per_layer: dict[str, list[dict[int, Tensor]]] = {
        name: [{} for _ in layers] for name in ("neurons", "bias", "increase")
    }
    for indices in groups_by_length(problems, lambda p: len(p.prompt_ids)):
        tokens = torch.tensor([problems[i].prompt_ids for i in indices])
        answer = torch.tensor([problems[i].answer_ids[0] for i in indices])
        with torch.no_grad():
            record = fm.record(tokens, keep=("resid_mid",))
        for slot, layer in enumerate(layers):
            w = fm.layers[layer]
            h = record.kept("resid_mid")[layer][:, -1]  # [n, d_model]
            with torch.no_grad():
                acts = neuron_activations(fm, layer, h)  # [n, d_mlp]
                bias = w.b_out if w.b_out is not None else torch.zeros(fm.d_model)
                delta = acts @ w.W_out + bias
                increase = lens_log_prob(fm, h + delta, answer) - lens_log_prob(fm, h, answer)
            grad = torch.zeros_like(h)
            for alpha in alphas:
                point = (h + alpha * delta).detach().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(lens_log_prob(fm, point, answer).sum(), point)
                grad += g / steps
            with torch.no_grad():
                shares = acts * (grad @ w.W_out.T)
                bias_share = grad @ bias
            for row, i in enumerate(indices):
                per_layer["neurons"][slot][i] = shares[row]
                per_layer["bias"][slot][i] = bias_share[row]
                per_layer["increase"][slot][i] = increase[row]
    stack = {
        name: torch.stack([torch.stack([row[i] for i in range(len(problems))]) for row in rows])
        for name, rows in per_layer.items()
    }
    return NeuronAttribution(
        model_name=model.name,
        ids=[p.id for p in problems],
        layers=layers,
        neurons=stack["neurons"],
        bias=stack["bias"],
        increase=stack["increase"],
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Ablation: zeroing the top neurons against as many random ones
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def zeroing_neurons(model, neurons: Mapping[int, Sequence[int]]):
    """Within this block, the given neurons (layer -> indices) output 0 at the last position of every forward."""
    handles = []
    for layer, indices in neurons.items():
        index = torch.tensor(sorted(indices), dtype=torch.long)

        def zero(module, args, out, index=index):
            out = out.clone()
            out[:, -1, index] = 0.0
            return out

        handles.append(key_point(model, layer).register_forward_hook(zero))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _LastPositionRunner:
    """Scores the problems' last position again and again under different neuron ablations: the keys and values of
    every earlier position are computed once (an ablation at the last position cannot change them) and each run
    is a one-token forward pass through the Hugging Face model's own cache."""

    def __init__(self, model, problems: Sequence[AdditionProblem]):
        self.model = model
        self.groups = []
        with torch.no_grad():
            for indices in groups_by_length(problems, lambda p: len(p.prompt_ids)):
                group = [problems[i] for i in indices]
                tokens = torch.tensor([p.prompt_ids for p in group])
                cache = model.hf_model(tokens[:, :-1], use_cache=True).past_key_values
                self.groups.append((group, tokens[:, -1:], cache))

    @torch.no_grad()
    def scores(self) -> pd.DataFrame:
        """Per problem: log p(first answer token) at the last position and whether it is the top prediction."""
        rows = []
        for group, last, cache in self.groups:
            logits = self.model.hf_model(last, past_key_values=cache, use_cache=True).logits[:, -1].float()
            cache.crop(-1)  # forget the position just run: the cache holds the prompt prefix again
            log_probs = torch.log_softmax(logits, -1)
            for p, lp, top in zip(group, log_probs, logits.argmax(-1)):
                rows.append(
                    {"problem": p.id, "log_prob": float(lp[p.answer_ids[0]]), "correct": int(top) == p.answer_ids[0]}
                )
        return pd.DataFrame(rows)


def ablation_test(
    model,
    problems: Sequence[AdditionProblem],
    attribution: NeuronAttribution,
    counts: Sequence[int] = (10, 30, 100),
    n_random: int = 5,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """For each ``k`` in ``counts``: zero the ``k`` neurons of largest mean share (among ``layers``; all when None),
    and ``n_random`` sets of ``k`` random neurons with the same number per layer; the mean log-probability of the
    answer and the accuracy."""
    runner = _LastPositionRunner(model, problems)
    base = runner.scores()
    rng = random.Random(seed)
    d_mlp = attribution.neurons.shape[-1]
    rows = [
        {
            "condition": "none",
            "k": 0,
            "draw": 0,
            "log_prob": base["log_prob"].mean(),
            "accuracy": base["correct"].mean(),
        }
    ]
    for k in counts:
        top = attribution.top(k, layers)
        chosen: dict[int, list[int]] = defaultdict(list)
        for layer, neuron in zip(top["layer"], top["neuron"]):
            chosen[int(layer)].append(int(neuron))
        with zeroing_neurons(model, chosen):
            scores = runner.scores()
        rows.append(
            {
                "condition": "top",
                "k": k,
                "draw": 0,
                "log_prob": scores["log_prob"].mean(),
                "accuracy": scores["correct"].mean(),
            }
        )
        for draw in range(n_random):
            random_set = {
                layer: rng.sample([n for n in range(d_mlp) if n not in kept], len(kept))
                for layer, kept in chosen.items()
            }
            with zeroing_neurons(model, random_set):
                scores = runner.scores()
            rows.append(
                {
                    "condition": "random",
                    "k": k,
                    "draw": draw,
                    "log_prob": scores["log_prob"].mean(),
                    "accuracy": scores["correct"].mean(),
                }
            )
    table = pd.DataFrame(rows)
    table["log_prob_drop"] = rows[0]["log_prob"] - table["log_prob"]
    return table


def ablation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per ``k``: the top neurons' drop beside the random sets' mean and spread."""
    out = []
    for k, group in table[table["k"] > 0].groupby("k"):
        top = group[group["condition"] == "top"].iloc[0]
        random_rows = group[group["condition"] == "random"]
        out.append(
            {
                "k": int(k),
                "top: log-prob drop": float(top["log_prob_drop"]),
                "random: log-prob drop (mean)": float(random_rows["log_prob_drop"].mean()),
                "random: log-prob drop (sd)": float(np.std(random_rows["log_prob_drop"], ddof=1))
                if len(random_rows) > 1
                else float("nan"),
                "top: accuracy": float(top["accuracy"]),
                "random: accuracy (mean)": float(random_rows["accuracy"].mean()),
            }
        )
    return pd.DataFrame(out)
