"""The keys' second moment ``C = E[k kᵀ]`` that ROME's and MEMIT's updates are measured in, and the text it comes from.

A key is the MLP's hidden activation (the input of its output projection, read at
:func:`mechfin_utils.core.hook_points.key_point`). ROME's update is the smallest change to the output matrix *over
the keys the layer normally sees*, so it needs their second moment over ordinary text; ROME used 100,000 Wikipedia
passages. Offline, the text we have is what the model writes itself: :func:`self_generated_corpus` samples it
(seeded, kept in the mechfin cache after the first run), :func:`key_covariance` estimates ``C`` (each forward
stopped at the layer that holds the keys), and :func:`covariance_convergence` shows how far the estimate has
settled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechfin_utils.core.hook_points import EditSite, KeysRead, output_matrix, padded_logits, reading_keys
from mechfin_utils.core.models import LoadedModel
from mechfin_utils.core.paths import cache_dir

# ---------------------------------------------------------------------------------------------------------
# 1. Covariance of the keys over text the model writes itself
# ---------------------------------------------------------------------------------------------------------

# Openings for self-generated text: varied registers, so that the keys are not all about one topic.
CORPUS_OPENERS = (
    "The",
    "In",
    "A",
    "It",
    "When",
    "My",
    "Scientists",
    "The city",
    "History",
    "Yesterday",
    "One of the",
    "Here is",
    "According to",
    "There",
    "Many people",
    "Today",
)


@torch.no_grad()
def self_generated_corpus(
    model: LoadedModel,
    n_sequences: int = 64,
    n_tokens: int = 96,
    *,
    seed: int = 0,
    batch_size: int = 64,
    cache: bool = True,
) -> list[list[int]]:
    """``n_sequences`` texts sampled from the model (temperature 1, top-k 50), each ``n_tokens`` new tokens long.

    The covariance ROME needs is of the keys on *ordinary* text; offline, the model's own writing is the text we
    have (ROME used 100,000 Wikipedia passages). Sampling is seeded, so the corpus is reproducible. Generation is
    step-bound on a CPU (each new token is one pass of the whole batch), so one large batch is fastest. With
    ``cache`` the corpus is kept in the mechfin cache (like the converted model) and later calls read it.
    """
    if n_sequences < 1 or n_tokens < 1:
        raise ValueError(f"n_sequences and n_tokens must be >= 1, got {n_sequences}, {n_tokens}")
    cached = _corpus_file(model, n_sequences, n_tokens, seed) if cache else None
    if cached is not None and cached.is_file():
        return torch.load(cached)
    torch.manual_seed(seed)
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    corpus: list[list[int]] = []
    for start in range(0, n_sequences, batch_size):
        openers = [
            CORPUS_OPENERS[(start + i) % len(CORPUS_OPENERS)] for i in range(min(batch_size, n_sequences - start))
        ]
        prompts = [model.token_ids(o) for o in openers]
        width = max(len(p) for p in prompts)  # left-pad for generation
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.hf_model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=50,
            temperature=1.0,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            pad_token_id=pad,
        )
        for i, p in enumerate(prompts):
            corpus.append(p + out[i, width:].tolist())
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(corpus, cached.with_suffix(".tmp"))
        cached.with_suffix(".tmp").replace(cached)
    return corpus


def _corpus_file(model: LoadedModel, n_sequences: int, n_tokens: int, seed: int) -> Path:
    """Where a generated corpus is kept: the model's name, the settings, and a fingerprint of its weights (so a
    different checkpoint under the same name, or a screener, never reuses another model's text)."""
    with torch.no_grad():
        embedding = model.hf_model.get_input_embeddings().weight
        fingerprint = hashlib.sha256(f"{embedding.double().sum().item():.10e}|{embedding.shape}".encode()).hexdigest()[
            :12
        ]
    settings = hashlib.sha256(repr((CORPUS_OPENERS, n_sequences, n_tokens, seed, 50, 1.0)).encode()).hexdigest()[:12]
    return cache_dir() / "corpora" / f"{model.slug}-{fingerprint}-{settings}.pt"


@dataclass
class KeyCovariance:
    """``E[k kᵀ]`` (uncentred, as in ROME) of one layer's keys over ``n_tokens`` corpus tokens; ``site`` names the
    projection whose keys they are (:data:`~mechfin_utils.core.hook_points.EDIT_SITES`)."""

    layer: int
    matrix: Float[Tensor, "d_mlp d_mlp"]
    n_tokens: int
    site: str = "mlp"

    def solve(self, keys: Float[Tensor, "d_mlp n"]) -> Float[Tensor, "d_mlp n"]:
        """``C⁻¹ keys`` (in float64: ``C`` is ill-conditioned along rarely used directions)."""
        return torch.linalg.solve(self.matrix.double(), keys.double()).to(keys.dtype)


def prefix_sizes(n_texts: int, fractions: Sequence[float]) -> dict[float, int]:
    """The number of corpus texts each fraction of a corpus of ``n_texts`` stands for (at least one)."""
    return {fraction: max(1, round(n_texts * fraction)) for fraction in fractions}


@torch.no_grad()
def layer_prefix_covariances(
    model: LoadedModel,
    layers: Sequence[int | EditSite],
    corpus: Sequence[Sequence[int]],
    stops: Sequence[int],
    batch_size: int = 16,
) -> dict[int, dict[int, KeyCovariance | None]]:
    """One pass over ``corpus``: for every layer in ``layers``, the keys' second moment over the corpus's first ``n``
    texts for each ``n`` in ``stops`` (None where too few key vectors make it singular): ``{layer: {n: C}}``. BOS
    rows are left out; each forward stops at the deepest layer asked for. Every covariance a notebook needs (the
    edited layers, a runner-up, the prefixes of a convergence check) costs one pass, not one each. ``layers`` may be
    :class:`~mechfin_utils.core.hook_points.EditSite` objects of one kind instead (another projection's keys)."""
    sites = {site.layer: site for site in layers if isinstance(site, EditSite)}
    if sites and len(sites) != len(layers):
        raise ValueError("layer_prefix_covariances: give layer numbers or edit sites, one site per layer, not a mix")
    if len({site.name for site in sites.values()}) > 1:
        raise ValueError("layer_prefix_covariances: the edit sites must be of one kind")
    kind = next(iter(sites.values())).name if sites else "mlp"
    layers, wanted = sorted({site if isinstance(site, int) else site.layer for site in layers}), set(stops)
    if not layers:
        raise ValueError("layer_prefix_covariances: no layer asked for")
    d_mlp = {layer: (sites[layer].weight if sites else output_matrix(model, layer)).shape[1] for layer in layers}
    first = 1 if model.prepend_bos else 0  # the BOS key is the same in every text: leave it out
    totals: dict[int, Tensor] = {}
    out: dict[int, dict[int, KeyCovariance | None]] = {layer: {} for layer in layers}
    count = done = 0
    with ExitStack() as stack:
        seen = {
            layer: stack.enter_context(reading_keys(model, sites.get(layer, layer), stop=layer == layers[-1]))
            for layer in layers
        }
        for start in range(0, len(corpus), batch_size):
            rows = corpus[start : start + batch_size]
            try:
                padded_logits(model, rows)
            except KeysRead:
                pass
            keys = {layer: seen[layer].pop() for layer in layers}
            for i, row in enumerate(rows):
                for layer in layers:
                    k = keys[layer][i, first : len(row)].double()
                    totals[layer] = k.T @ k if layer not in totals else totals[layer] + k.T @ k
                count, done = count + len(row) - first, done + 1
                if done in wanted:
                    for layer in layers:
                        estimate = (totals[layer] / count).float()
                        enough = count > d_mlp[layer]
                        out[layer][done] = KeyCovariance(layer, estimate, count, kind) if enough else None
    return out


def prefix_covariances(
    model: LoadedModel, layer: int, corpus: Sequence[Sequence[int]], stops: Sequence[int], batch_size: int = 16
) -> dict[int, KeyCovariance | None]:
    """:func:`layer_prefix_covariances` of one layer: ``{n: C over the first n texts}``."""
    return layer_prefix_covariances(model, [layer], corpus, stops, batch_size)[layer]


def key_covariance(
    model: LoadedModel, layer: int | EditSite, corpus: Sequence[Sequence[int]], *, batch_size: int = 16
) -> KeyCovariance:
    """The keys' second moment at ``layer`` (or at an :class:`~mechfin_utils.core.hook_points.EditSite`) over every
    position of ``corpus`` (BOS rows left out).

    ``d_mlp`` directions need well over ``d_mlp`` tokens for ``C`` to be invertible; fewer is an error.
    """
    number = layer.layer if isinstance(layer, EditSite) else layer
    estimate = layer_prefix_covariances(model, [layer], corpus, [len(corpus)], batch_size)[number].get(len(corpus))
    if estimate is None:
        n_keys = sum(max(0, len(row) - (1 if model.prepend_bos else 0)) for row in corpus)
        d_mlp = (layer.weight if isinstance(layer, EditSite) else output_matrix(model, layer)).shape[1]
        raise ValueError(f"key_covariance: {n_keys} key vectors for d_mlp = {d_mlp}; use a larger corpus")
    return estimate


def fraction_covariances(
    model: LoadedModel,
    layer: int,
    corpus: Sequence[Sequence[int]],
    fractions: Sequence[float],
    given: Mapping[int, KeyCovariance | None] | None = None,
    *,
    caller: str = "fraction_covariances",
) -> tuple[dict[float, int], Mapping[int, KeyCovariance | None]]:
    """The texts each fraction of ``corpus`` stands for, and this layer's ``{n texts: C}`` for those and the whole
    corpus: ``given`` (from :func:`layer_prefix_covariances`), checked to hold every one, else one pass."""
    sizes = prefix_sizes(len(corpus), fractions)
    needed = [*sizes.values(), len(corpus)]
    if given is None:
        return sizes, prefix_covariances(model, layer, corpus, needed)
    missing = [n for n in needed if n not in given]
    if missing:
        raise ValueError(f"{caller}: the covariances given have none over the first {missing} texts")
    return sizes, given


def covariance_convergence(
    model: LoadedModel,
    layer: int,
    corpus: Sequence[Sequence[int]],
    probe_keys: Float[Tensor, "d_mlp n"],
    fractions: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
    *,
    estimates: Mapping[int, KeyCovariance | None] | None = None,
) -> list[dict]:
    """How the estimate settles as the corpus grows: for each fraction of ``corpus``, the tokens used and the mean
    cosine between ``C⁻¹k`` (ROME's update direction) for ``probe_keys`` and the same from the whole corpus.
    Every prefix comes from one pass over the corpus; ``estimates`` (``{n texts: C}`` of this layer, from
    :func:`layer_prefix_covariances`) saves even that."""
    sizes, estimates = fraction_covariances(model, layer, corpus, fractions, estimates, caller="covariance_convergence")
    full = estimates[len(corpus)]
    if full is None:
        full = key_covariance(model, layer, corpus)  # raises, naming the count
    reference = full.solve(probe_keys)
    rows = []
    for fraction, size in sizes.items():
        estimate = estimates[size]
        if estimate is None:
            continue  # too few tokens for an invertible estimate at this size
        directions = estimate.solve(probe_keys)
        cosine = torch.nn.functional.cosine_similarity(directions, reference, dim=0)
        rows.append({"fraction": fraction, "n_tokens": estimate.n_tokens, "mean_cosine_to_full": cosine.mean().item()})
    return rows
