"""Token-id arguments, checked once for every analysis: what a bad one gets told, naming the argument."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

INTEGER_DTYPES = (torch.int64, torch.int32)


def check_tokens(
    tokens: object, d_vocab: int, *, argument: str = "tokens", model_name: str = "the model"
) -> Int[Tensor, "batch pos"]:
    """``tokens`` as every analysis takes them: a non-empty ``[batch, pos]`` integer tensor of ids in the vocabulary.

    Raises TypeError when it is not a tensor at all (a list of prompts, say), ValueError for a tensor of another
    shape or dtype, or one holding an id outside ``0 .. d_vocab - 1`` (the first such entry named by row and
    position). Returns ``tokens`` unchanged.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"{argument} must be a [batch, pos] tensor of token ids (from model.to_tokens), got {type(tokens).__name__}"
        )
    if tokens.dtype not in INTEGER_DTYPES or tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(
            f"{argument} must be an integer tensor of token ids, non-empty [batch, pos] (from model.to_tokens); "
            f"got shape {tuple(tokens.shape)} dtype {tokens.dtype}"
        )
    bad = (tokens < 0) | (tokens >= d_vocab)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{argument}[{row}, {pos}] = {int(tokens[row, pos])} is not a token id of {model_name} "
            f"(vocabulary size {d_vocab})"
        )
    return tokens


def check_token_pairs(
    clean_tokens: object, corrupted_tokens: object, d_vocab: int, *, model_name: str = "the model"
) -> None:
    """Both runs of a patching-style comparison checked (:func:`check_tokens`), and of one shape: prompt ``b`` and
    position ``p`` of one run are paired with the other's."""
    clean = check_tokens(clean_tokens, d_vocab, argument="clean_tokens", model_name=model_name)
    corrupted = check_tokens(corrupted_tokens, d_vocab, argument="corrupted_tokens", model_name=model_name)
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean_tokens has shape {tuple(clean.shape)} but corrupted_tokens has "
            f"{tuple(corrupted.shape)}: patching pairs prompts row by row and position by position, so both "
            "need the same batch size and token length (no padding is ever added; group prompts by length, e.g. "
            "tasks.make_batches)"
        )
