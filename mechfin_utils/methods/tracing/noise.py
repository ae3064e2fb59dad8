"""The corrupting noise of causal tracing: Gaussian noise on the subject's input embeddings.

Causal tracing (:mod:`mechfin_utils.methods.tracing.causal_trace`) destroys an answer by adding noise to the
input embeddings of the *subject* tokens ("Eiffel Tower" in "The Eiffel Tower is located in the city of"), then
measures how much of the answer restoring one clean state brings back. This module says how large that noise
is and draws it:

* **unit**: :func:`embedding_noise_std` -- by default the standard deviation of *all entries of the model's
  input embedding matrix* (:func:`input_embedding_matrix`, the table ``hook_embed`` looks up); it can instead use
  a reference set of texts (ROME used the embeddings of its subjects);
* **scale**: ``DEFAULT_NOISE_MULTIPLIER`` (3, as ROME) times that unit;
* **draws**: :func:`sample_subject_noise`, reproducible from a seed (``DEFAULT_SEED``). Every restoration of a
  prompt sees the *same* noise samples, so restorations are compared on equal terms.

The noise is added at ``hook_embed`` -- the token embedding, before GPT-2 adds its position embedding -- to the
subject tokens only (:mod:`mechfin_utils.methods.tracing.restoration` does the adding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from mechfin_utils.core.models import LoadedModel

DEFAULT_NOISE_MULTIPLIER = 3.0
DEFAULT_SEED = 1


def input_embedding_matrix(model: LoadedModel) -> Float[Tensor, "d_vocab d_model"]:
    """The table ``hook_embed`` looks up (checked against ``hook_embed`` in the tests).

    It is the bridge's (compatibility-mode) weight: for LayerNorm models such as GPT-2 the bridge has
    centred each embedding, which changes nothing downstream (LayerNorm removes the mean) but is the space
    the noise is added in, so its standard deviation is taken here too.
    """
    return model.hf_model.get_input_embeddings().weight


@torch.no_grad()
def embedding_noise_std(model: LoadedModel, reference_texts: Sequence[str] | None = None) -> float:
    """Standard deviation of the input embeddings, the unit of the corrupting noise.

    ``reference_texts=None`` (default): over all entries of the input embedding matrix. Otherwise: over
    the embeddings of the tokens of ``reference_texts`` (e.g. the subjects, as ROME did), each token
    occurrence counted once, BOS excluded.
    """
    table = input_embedding_matrix(model).float()
    if reference_texts is None:
        return float(table.std())
    ids = [i for text in reference_texts for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("reference_texts produced no tokens")
    return float(table[torch.tensor(ids)].std())


def sample_subject_noise(
    n_samples: int, n_subject_tokens: int, d_model: int, std: float, seed: int = DEFAULT_SEED
) -> Float[Tensor, "sample subject_pos d_model"]:
    """``n_samples`` Gaussian noise draws of standard deviation ``std``, reproducible from ``seed``."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, n_subject_tokens, d_model, generator=generator) * std
