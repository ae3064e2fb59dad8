"""Behaviour first: does a model make the fair-lending decision, on prompts as they come?

Every analysis in mechfin explains ``logit(" Yes") - logit(" No")`` at the last position. Before explaining it we
measure whether the model *makes* the decision, as a compliance screener would be judged:

* **per pair** — the logit difference (LD) on the clean prompt (prohibited basis, expected `` Yes``) and on its
  corrupted twin (legitimate reason, expected `` No``), and the paired gap;
* **as a classifier** — each prompt is answered `` Yes`` when its LD is above 0. *Accuracy* is over all prompts
  (both of every pair); *AUROC* is the probability that a random clean prompt scores above a random corrupted
  one (threshold-free; 0.5 = chance);
* **calibration** — ``p(Yes) = sigmoid(LD)``, the probability of `` Yes`` renormalised over the two answers,
  against the truth: the *Brier score* (mean squared error, 0.25 for a constant 0.5) and the *expected
  calibration error* (ECE: the gap between mean confidence and accuracy, averaged over 10 equal-width bins);
* **per basis**, with percentile-bootstrap intervals that resample *pairs* (``stats``);
* **control prompts** — single prompts with a known answer where a screener keyed on surface cues fails.

Unlike activation patching, nothing here needs the two prompts of a pair to have the same token length: prompts are
sorted by length and run in right-padded batches, each read at its own last token. A prompt longer than the model's context is refused, naming its row.

A scorer is anything with ``logit_diffs(prompts) -> [n]`` and ``token_count(prompt)``: :class:`BridgeScorer`
wraps a :class:`~mechfin_utils.core.models.LoadedModel`; :class:`HFScorer` a plain Hugging Face model (used while
training, before the bridge has processed the weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from mechfin_utils.core import engine
from mechfin_utils.core.functional import functional_model
from mechfin_utils.core.head_labels import Node
from mechfin_utils.core.stats import auroc, bootstrap_ci, paired_bootstrap_ci
from mechfin_utils.screener.score_cache import RunScoreCache, run_cache_folder, weights_fingerprint
from mechfin_utils.tasks.fair_lending import FAIR_LENDING_ANSWERS, FairLendingPair

N_CALIBRATION_BINS = 10


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context; the message names the row."""


class Scorer(Protocol):
    name: str
    n_ctx: int

    def token_count(self, prompt: str) -> int: ...

    def logit_diffs(self, prompts: Sequence[str]) -> Float[np.ndarray, " n"]: ...


# ---------------------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------------------


class _PaddedBatchScorer:
    """Shared logic: tokenise, refuse over-long prompts, run prompts of similar length together, read two logits.

    Prompts are sorted by token length and cut into batches of ``batch_size``; each batch is padded on the right to
    its longest prompt and every row is read at its own last real token. Attention is causal, so padding after that
    token cannot change it: the result is each prompt's own logit difference, up to the float rounding of a larger
    matrix product (the tests compare with single prompts through Hugging Face). Sorting first keeps the padding
    small (neighbours in the sorted order differ by a token or two).
    """

    name: str
    n_ctx: int
    batch_size: int = 32

    def _ids(self, prompt: str) -> list[int]:
        raise NotImplementedError

    def _final_logit_diffs(
        self, tokens: Int[torch.Tensor, "batch pos"], last: Int[torch.Tensor, " batch"]
    ) -> Float[torch.Tensor, " batch"]:
        raise NotImplementedError

    def _one_length_per_batch(self) -> bool:
        """Whether batches must hold prompts of one length (no padding): a subclass says so when a forward hook
        reads the last position as ``[:, -1]``."""
        return False

    def _run_cache(self) -> RunScoreCache | None:
        """Where this run's scores are shared (see :mod:`~mechfin_utils.screener.score_cache`); None: nowhere."""
        return None

    def token_count(self, prompt: str) -> int:
        return len(self._ids(prompt))

    def logit_diffs(self, prompts: Sequence[str]) -> Float[np.ndarray, " n"]:
        """``logit(" Yes") - logit(" No")`` at the last position of every prompt, in input order."""
        return self.logit_diffs_of_ids([self._ids(p) for p in prompts])

    @torch.no_grad()
    def logit_diffs_of_ids(self, token_rows: Sequence[Sequence[int]]) -> Float[np.ndarray, " n"]:
        """The same for prompts already tokenised (as this scorer's model tokenises them: its BOS decision applied),
        one list of token ids per prompt, in input order."""
        # 1. refuse every over-long prompt at once, by its index
        too_long = [f"prompt {i} ({len(r)} tokens)" for i, r in enumerate(token_rows) if len(r) > self.n_ctx]
        if too_long:
            raise PromptTooLongError(
                f"{len(too_long)} prompt(s) exceed {self.name}'s context of {self.n_ctx} tokens: " + ", ".join(too_long)
            )
        # 2. what this run has scored already (``make figures`` shares scores between notebooks: score_cache)
        out = np.empty(len(token_rows), dtype=np.float64)
        cache = self._run_cache()
        known = cache.lookup(token_rows) if cache is not None else {}
        for i, value in known.items():
            out[i] = value
        # 3. the rest shortest first, so that each batch pads little (or not at all, when hooks need one length per
        #    batch)
        order = sorted((i for i in range(len(token_rows)) if i not in known), key=lambda i: (len(token_rows[i]), i))
        one_length = self._one_length_per_batch()
        chunks: list[list[int]] = []
        for i in order:
            full = chunks and len(chunks[-1]) == self.batch_size
            new_length = chunks and one_length and len(token_rows[chunks[-1][0]]) != len(token_rows[i])
            if not chunks or full or new_length:
                chunks.append([])
            chunks[-1].append(i)
        for chunk in chunks:
            # 4. right-pad to the batch's longest prompt (token 0: any id will do, nothing before it can see it)
            width = max(len(token_rows[i]) for i in chunk)
            tokens = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                tokens[row, : len(token_rows[i])] = torch.tensor(token_rows[i], dtype=torch.long)
            last = torch.tensor([len(token_rows[i]) - 1 for i in chunk], dtype=torch.long)
            # 5. each row read at its own last token
            out[chunk] = self._final_logit_diffs(tokens, last).double().cpu().numpy()
        if cache is not None and order:
            cache.store([token_rows[i] for i in order], out[order].tolist())
        return out


class BridgeScorer(_PaddedBatchScorer):
    """Scores prompts with a :class:`~mechfin_utils.core.models.LoadedModel` (its BOS decision applies), through
    its functional forward pass (the same weights; only the two answers' logits are computed at one position).

    ``held_at_last`` (component -> value) scores a model with those components' outputs at the last position held
    at the given values (a head's ``z`` ``[d_head]``, an MLP's output ``[d_model]``): notebook 12's mean ablation
    at the answer position, run by the intervention engine
    (:func:`~mechfin_utils.core.engine.final_normed_plain_and_held`), one token length per batch. That run passes
    through the plain forward pass first; within a ``make figures`` run its scores are shared as the model's plain
    scores (:mod:`~mechfin_utils.screener.score_cache`), so the plain scores of the same prompts cost nothing after.

    While forward hooks are attached to the bridge (any intervention of one's own), the functional pass would not
    see them: the prompts then go through the bridge itself, one token length per batch, so that a hook reading the
    last position as ``[:, -1]`` reads each prompt's last token.
    """

    def __init__(
        self,
        model,
        answers: tuple[str, str] = FAIR_LENDING_ANSWERS,
        batch_size: int = 32,
        *,
        held_at_last: dict[Node, torch.Tensor] | None = None,
    ):
        self.model = model
        self.name = model.name if not held_at_last else f"{model.name} ({', '.join(c.name for c in held_at_last)} held)"
        self.n_ctx = int(model.cfg.n_ctx)
        self.answers = answers
        self.batch_size = batch_size
        self.held_at_last = dict(held_at_last or {})

    def _ids(self, prompt: str) -> list[int]:
        return self.model.token_ids(prompt)

    def _one_length_per_batch(self) -> bool:
        return bool(self.held_at_last) or _bridge_is_hooked(self.model.bridge)

    def _run_cache(self) -> RunScoreCache | None:
        return None if self.held_at_last else self._plain_run_cache()  # only plain passes are shared

    def _plain_run_cache(self) -> RunScoreCache | None:
        """Where this run shares the plain pass's scores of this model and these answers (None: nowhere, or hooks
        on the bridge)."""
        folder = run_cache_folder()
        if folder is None or _bridge_is_hooked(self.model.bridge):
            return None
        answer_ids = (self.model.single_token_id(self.answers[0]), self.model.single_token_id(self.answers[1]))
        return RunScoreCache(folder, weights_fingerprint(self.model.hf_model), answer_ids)

    def _final_logit_diffs(
        self, tokens: Int[torch.Tensor, "batch pos"], last: Int[torch.Tensor, " batch"]
    ) -> Float[torch.Tensor, " batch"]:
        device = self.model.cfg.device
        yes, no = (self.model.single_token_id(a) for a in self.answers)
        if _bridge_is_hooked(self.model.bridge):  # one length per batch here: every row ends at the last column
            if self.held_at_last:
                raise RuntimeError(f"{self.name}: hooks on the bridge and held components at once; use one of them")
            final = self.model.bridge(tokens.to(device))[:, -1, :]
            return final[:, yes] - final[:, no]
        fm = functional_model(self.model)
        answers = torch.tensor([[yes, no]], device=device)
        if self.held_at_last:  # one length per batch here too
            plain, normed = engine.final_normed_plain_and_held(fm, tokens.to(device), self.held_at_last)
            shared = self._plain_run_cache()
            if shared is not None:  # the plain pass ran on the way: its scores are this run's plain scores
                shared.store(tokens.tolist(), fm.logit_diff(plain, answers).double().cpu().tolist())
        else:
            normed = fm.final_normed_at(tokens.to(device), last.to(device))
        return fm.logit_diff(normed, answers)


def _bridge_is_hooked(bridge: torch.nn.Module) -> bool:
    """Whether a hook is attached to any of the bridge's hook points right now (an intervention: TransformerLens's
    ``bridge.hooks(...)``). Only hook points count: after its first forward pass the bridge keeps capture hooks of its
    own on the wrapped Hugging Face modules, which change nothing."""
    from transformer_lens.hook_points import HookPoint

    return any((m._forward_hooks or m._forward_pre_hooks) for m in bridge.modules() if isinstance(m, HookPoint))


class HFScorer(_PaddedBatchScorer):
    """Scores prompts with a plain Hugging Face causal LM and its tokenizer (BOS decision stated explicitly).

    Reads the model as it is at each call (the screener's training scores with it while the weights change): the
    decoder's final hidden state, then the two answers' rows of the output embedding.
    """

    def __init__(
        self,
        hf_model,
        tokenizer,
        *,
        prepend_bos: bool,
        name: str,
        answers: tuple[str, str] = FAIR_LENDING_ANSWERS,
        batch_size: int = 32,
    ):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        self.name = name
        config = hf_model.config
        self.n_ctx = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 1024))
        self.answers = answers
        self.batch_size = batch_size

    def _ids(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [self.tokenizer.bos_token_id] + ids if self.prepend_bos else ids

    def _final_logit_diffs(
        self, tokens: Int[torch.Tensor, "batch pos"], last: Int[torch.Tensor, " batch"]
    ) -> Float[torch.Tensor, " batch"]:
        # the decoder stack (LlamaModel, GPT2Model) ends with the final norm; the head is the output embedding
        hidden = self.hf_model.base_model(tokens).last_hidden_state[torch.arange(tokens.shape[0]), last]
        head = self.hf_model.get_output_embeddings()
        yes, no = answer_token_ids(self.tokenizer, self.answers, self.name)
        logits = hidden @ head.weight[[yes, no]].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[[yes, no]]
        return logits[:, 0] - logits[:, 1]


def answer_token_ids(tokenizer, answers: tuple[str, str], name: str) -> tuple[int, int]:
    """The single token id of each answer for a bare Hugging Face tokenizer; a ValueError naming the one that is not."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    for answer, piece in zip(answers, ids):
        if len(piece) != 1:
            raise ValueError(f"answer {answer!r} is {len(piece)} tokens for {name}, not one")
    return ids[0][0], ids[1][0]


def as_scorer(model_or_scorer: Any) -> Scorer:
    """A LoadedModel becomes a :class:`BridgeScorer`; anything with ``logit_diffs`` is used as it is."""
    if hasattr(model_or_scorer, "logit_diffs"):
        return model_or_scorer
    if hasattr(model_or_scorer, "bridge") and hasattr(model_or_scorer, "token_ids"):
        return BridgeScorer(model_or_scorer)
    raise TypeError(f"expected a LoadedModel or a scorer, got {type(model_or_scorer).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Classifier metrics
# ---------------------------------------------------------------------------------------------------------


def expected_calibration_error(
    p_yes: Float[np.ndarray, " n"], truth: Float[np.ndarray, " n"], n_bins: int = N_CALIBRATION_BINS
) -> float:
    """ECE of a two-way prediction: per bin of confidence ``max(p, 1 - p)``, |accuracy - mean confidence|,
    weighted by the bin's share of prompts."""
    p_yes, truth = np.asarray(p_yes, dtype=float), np.asarray(truth, dtype=float)
    confidence = np.maximum(p_yes, 1.0 - p_yes)
    correct = ((p_yes > 0.5) == (truth > 0.5)).astype(float)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def calibration_curve(
    p_yes: Float[np.ndarray, " n"], truth: Float[np.ndarray, " n"], n_bins: int = N_CALIBRATION_BINS
) -> pd.DataFrame:
    """Reliability table: per bin of predicted p(Yes), the number of prompts, mean p(Yes) and share truly Yes."""
    p_yes, truth = np.asarray(p_yes, dtype=float), np.asarray(truth, dtype=float)
    bins = np.clip((p_yes * n_bins).astype(int), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        members = bins == b
        if members.any():
            rows.append(
                {
                    "bin_low": b / n_bins,
                    "bin_high": (b + 1) / n_bins,
                    "n": int(members.sum()),
                    "mean_p_yes": float(p_yes[members].mean()),
                    "share_yes": float(truth[members].mean()),
                }
            )
    return pd.DataFrame(rows)


def _pair_metrics(clean: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    """Accuracy over all prompts, AUROC, mean gap, Brier and ECE for paired clean/corrupted LDs."""
    scores = np.concatenate([clean, corrupted])
    truth = np.concatenate([np.ones_like(clean), np.zeros_like(corrupted)])
    p_yes = 1.0 / (1.0 + np.exp(-scores))
    return {
        "accuracy": float(np.mean((scores > 0) == (truth > 0.5))),
        "auroc": auroc(clean, corrupted)
        if clean.size >= 2
        else float(np.mean((clean[:, None] > corrupted[None, :]) + 0.5 * (clean[:, None] == corrupted[None, :]))),
        "mean_gap": float(np.mean(clean - corrupted)),
        "brier": float(np.mean((p_yes - truth) ** 2)),
        "ece": expected_calibration_error(p_yes, truth),
    }


def _bootstrap_auroc(
    clean: np.ndarray, corrupted: np.ndarray, *, n_boot: int, seed: int, ci: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the AUROC, resampling pairs (both prompts of a drawn pair enter together).

    A resample that draws pair ``a`` ``w[a]`` times has AUROC ``sum_ab w[a] w[b] M[a, b] / n^2``, with ``M[a, b] = 1``
    where clean ``a`` scores above corrupted ``b`` and 1/2 on a tie (the Mann-Whitney statistic :func:`auroc`
    computes by ranks): every resample in one matrix product instead of a ranking each."""
    rng = np.random.default_rng(seed)
    n = clean.size
    wins = (clean[:, None] > corrupted[None, :]) + 0.5 * (clean[:, None] == corrupted[None, :])  # M, [n, n]
    counts = np.zeros((n_boot, n))
    for b in range(n_boot):  # the same draws, in the same order, as one resample at a time
        np.add.at(counts[b], rng.integers(0, n, size=n), 1.0)
    draws = np.einsum("bi,ij,bj->b", counts, wins, counts) / (n * n)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------------
# Evaluating a set of pairs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PairEvaluation:
    """A model's decisions on a set of pairs.

    ``scores``: one row per pair (``pair_id, basis, template_id, clean_ld, corrupted_ld, gap``).
    ``summary``: ``n, accuracy, accuracy_clean, accuracy_corrupted, auroc, mean_gap, brier, ece`` plus ``*_low`` /
    ``*_high`` bootstrap bounds for the accuracies, AUROC and the gap. ``by_basis``: the same per basis. ``excluded``: ``(pair_id, reason)`` for
    pairs that could not be scored (e.g. longer than the context), never dropped silently.
    """

    model_name: str
    label: str
    scores: pd.DataFrame
    summary: dict[str, Any]
    by_basis: pd.DataFrame
    excluded: list[tuple[str, str]]

    def calibration(self, n_bins: int = N_CALIBRATION_BINS) -> pd.DataFrame:
        """Reliability table of p(Yes) = sigmoid(LD) over all prompts (clean truly Yes, corrupted truly No)."""
        scores = np.concatenate([self.scores["clean_ld"], self.scores["corrupted_ld"]])
        truth = np.concatenate([np.ones(len(self.scores)), np.zeros(len(self.scores))])
        return calibration_curve(1.0 / (1.0 + np.exp(-scores)), truth, n_bins)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "set": self.label,
            **self.summary,
            "by_basis": self.by_basis.reset_index().to_dict(orient="records"),
            "excluded": [{"pair_id": i, "reason": r} for i, r in self.excluded],
        }


def _summarise(clean: np.ndarray, corrupted: np.ndarray, *, n_boot: int, seed: int) -> dict[str, Any]:
    """The pair metrics, each side's accuracy on its own (``accuracy_clean``: the share of clean prompts answered
    " Yes", the discrimination flagged; ``accuracy_corrupted``: the share of corrupted prompts answered " No", the
    lawful decision cleared), and bootstrap intervals over pairs."""
    clean_right, corrupted_right = (clean > 0).astype(float), (corrupted <= 0).astype(float)
    out: dict[str, Any] = {
        "n": int(clean.size),
        **_pair_metrics(clean, corrupted),
        "accuracy_clean": float(clean_right.mean()),
        "accuracy_corrupted": float(corrupted_right.mean()),
    }
    if clean.size >= 2:
        gap = paired_bootstrap_ci(clean, corrupted, n_boot=n_boot, seed=seed)
        out["mean_gap_low"], out["mean_gap_high"] = gap.low, gap.high
        # accuracy over prompts = mean over pairs of (clean right + corrupted right) / 2
        accuracy = bootstrap_ci((clean_right + corrupted_right) / 2.0, n_boot=n_boot, seed=seed)
        out["accuracy_low"], out["accuracy_high"] = accuracy.low, accuracy.high
        for side, right in (("clean", clean_right), ("corrupted", corrupted_right)):
            interval = bootstrap_ci(right, n_boot=n_boot, seed=seed)
            out[f"accuracy_{side}_low"], out[f"accuracy_{side}_high"] = interval.low, interval.high
        out["auroc_low"], out["auroc_high"] = _bootstrap_auroc(clean, corrupted, n_boot=n_boot, seed=seed)
    else:
        for key in ("mean_gap", "accuracy", "accuracy_clean", "accuracy_corrupted", "auroc"):
            out[f"{key}_low"] = out[f"{key}_high"] = float("nan")
    return out


def evaluate_pairs(
    model_or_scorer: Any, pairs: Sequence[FairLendingPair], *, label: str = "pairs", n_boot: int = 1000, seed: int = 0
) -> PairEvaluation:
    """Score every pair (any token lengths) and summarise the decision overall and per basis.

    Pairs whose prompts exceed the model's context are excluded with that reason (listed in ``excluded``);
    everything else is scored.
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to evaluate")
    scorer = as_scorer(model_or_scorer)
    kept, excluded = [], []
    for pair in pairs:
        lengths = [scorer.token_count(t) for t in pair.texts]
        if max(lengths) > scorer.n_ctx:
            excluded.append((pair.id, f"longer than the context of {scorer.n_ctx} tokens ({max(lengths)} tokens)"))
        else:
            kept.append(pair)
    if not kept:
        raise PromptTooLongError(f"every pair exceeds {scorer.name}'s context of {scorer.n_ctx} tokens")
    lds = scorer.logit_diffs([t for p in kept for t in p.texts])
    clean, corrupted = lds[0::2], lds[1::2]
    scores = pd.DataFrame(
        {
            "pair_id": [p.id for p in kept],
            "basis": [p.basis for p in kept],
            "template_id": [p.template_id for p in kept],
            "clean_ld": clean,
            "corrupted_ld": corrupted,
            "gap": clean - corrupted,
        }
    )
    return summarise_scores(scores, scorer.name, label, excluded, n_boot=n_boot, seed=seed)


def summarise_scores(
    scores: pd.DataFrame, model_name: str, label: str, excluded=(), *, n_boot: int = 1000, seed: int = 0
) -> PairEvaluation:
    """A :class:`PairEvaluation` from per-pair scores (e.g. several evaluations' ``scores`` concatenated, to pool
    sets without running the model again)."""
    rows = {}
    for basis, group in scores.groupby("basis"):
        rows[basis] = _summarise(
            group["clean_ld"].to_numpy(), group["corrupted_ld"].to_numpy(), n_boot=n_boot, seed=seed
        )
    by_basis = pd.DataFrame.from_dict(rows, orient="index")
    by_basis.index.name = "basis"
    summary = _summarise(scores["clean_ld"].to_numpy(), scores["corrupted_ld"].to_numpy(), n_boot=n_boot, seed=seed)
    return PairEvaluation(model_name, label, scores, summary, by_basis, list(excluded))


def evaluate_controls(model_or_scorer: Any, controls: Sequence) -> pd.DataFrame:
    """One row per control prompt: its kind, basis, expected answer, LD, p(Yes) and whether the model is right."""
    scorer = as_scorer(model_or_scorer)
    lds = scorer.logit_diffs([c.prompt for c in controls])
    expected_yes = np.array([c.answer == FAIR_LENDING_ANSWERS[0] for c in controls])
    return pd.DataFrame(
        {
            "control_id": [c.control_id for c in controls],
            "kind": [c.kind for c in controls],
            "basis": [c.basis for c in controls],
            "expected": [c.answer.strip() for c in controls],
            "ld": lds,
            "p_yes": 1.0 / (1.0 + np.exp(-lds)),
            "correct": (lds > 0) == expected_yes,
            "prompt": [c.prompt for c in controls],
        }
    )


def controls_by_kind(control_scores: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy per control kind with a bootstrap interval (resampling prompts), and the mean p(Yes)."""
    rows = []
    for kind, group in control_scores.groupby("kind", sort=False):
        correct = group["correct"].to_numpy(dtype=float)
        if correct.size >= 2:
            interval = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
            low, high = interval.low, interval.high
        else:
            low = high = float("nan")
        rows.append(
            {
                "kind": kind,
                "expected": group["expected"].iloc[0],
                "n": int(correct.size),
                "accuracy": float(correct.mean()),
                "accuracy_low": low,
                "accuracy_high": high,
                "mean_p_yes": float(group["p_yes"].mean()),
            }
        )
    return pd.DataFrame(rows).set_index("kind")


def behaviour_table(evaluations) -> pd.DataFrame:
    """One row per (model, set) from ``{(model name, set name): PairEvaluation}``: n, accuracy, AUROC, gap,
    Brier, ECE with their intervals."""
    rows = [{"model": model, "set": label, **evaluation.summary} for (model, label), evaluation in evaluations.items()]
    return pd.DataFrame(rows).set_index(["model", "set"])
