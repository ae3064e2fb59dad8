"""Token sets: which tokens a projection's table reads, from words, from the prompts, or from the vocabulary.

The projections to the vocabulary score tens of thousands of tokens; a readable table restricts them to a set.
Four ways to build one, each returning token ids:

* :func:`token_set_ids` -- words written out by hand with their variants (``" yes"``, ``" Yes"``...), keeping
  those that are single tokens and returning the rest, so nothing is left out silently;
* :func:`prompt_word_ids` -- the distinct word tokens of a task's prompts (a task vocabulary);
* :func:`phrase_vocabulary` -- the word tokens of the swapped phrases, split into protected-basis only,
  legitimate-reason only and shared;
* :func:`frequent_token_ids` -- the first ``n`` word tokens of the vocabulary, id order standing in for frequency.

"Word" means a token whose text matches a pattern (:data:`WORD_TOKEN_PATTERN` by default: letters, with or
without a leading space), so punctuation, digits and special tokens stay out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from mechfin_utils.core.models import LoadedModel

WORD_TOKEN_PATTERN = r"^ ?[A-Za-z]{2,}$"
"""A token that is a word (or a word piece) of letters, with or without its leading space."""


# ---------------------------------------------------------------------------------------------------------
# Tokens chosen by hand, from the prompts, from the swapped phrases
# ---------------------------------------------------------------------------------------------------------


def token_set_ids(model: LoadedModel, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of the strings that are single tokens, and the list of those that are not (reported, not hidden).

    Token sets for :func:`~mechfin_utils.methods.readout.ffn_updates.fraction_in_token_set` are usually written
    as words with variants (``" yes"``, ``" Yes"``, ``"Yes"``...); a variant that is several tokens cannot be "a
    top token" and is returned in the second list so the caller can show what was left out.
    """
    ids, multi = [], []
    for w in words:
        pieces = model.tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(pieces) == 1:
            ids.append(int(pieces[0]))
        else:
            multi.append(w)
    return ids, multi


def prompt_word_ids(model: LoadedModel, texts: Sequence[str], pattern: str = WORD_TOKEN_PATTERN) -> list[int]:
    """The distinct word tokens of the prompts, in first-seen order: a task vocabulary for circuit tables.

    Tokens whose decoded text does not match ``pattern`` (punctuation, digits, special tokens) are left out.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of prompts")
    regex = re.compile(pattern)
    special = set(model.tokenizer.all_special_ids)
    out: list[int] = []
    for text in texts:
        for tid in model.tokenizer(text, add_special_tokens=False)["input_ids"]:
            if tid not in special and tid not in out and regex.match(model.tokenizer.decode([tid])):
                out.append(int(tid))
    if not out:
        raise ValueError(f"no token of the prompts matches {pattern!r}")
    return out


class PhraseVocabulary(NamedTuple):
    """Word tokens of the task's swapped phrases: only in protected-basis phrases, only in legitimate-reason
    phrases, and in both (template words such as `` because`` or `` his``), each in first-seen order."""

    protected_only: list[int]
    legitimate_only: list[int]
    shared: list[int]


def phrase_vocabulary(model: LoadedModel, pairs: Sequence, pattern: str = WORD_TOKEN_PATTERN) -> PhraseVocabulary:
    """Split the word tokens of the pairs' ``protected_phrase`` / ``legitimate_phrase`` into three sets.

    A phrase is tokenised as it appears mid-sentence (after a space); only tokens whose text matches
    ``pattern`` (default: letters, with or without a leading space) are kept, so punctuation is not a "word".
    """
    regex = re.compile(pattern)
    seen: dict[str, list[int]] = {"protected": [], "legitimate": []}
    for i, pair in enumerate(pairs):
        for side in ("protected", "legitimate"):
            phrase = getattr(pair, f"{side}_phrase", None)
            if not isinstance(phrase, str) or not phrase.strip():
                raise ValueError(f"pairs[{i}] ({getattr(pair, 'id', '?')}) has no {side}_phrase")
            for tid in model.tokenizer(" " + phrase.strip(), add_special_tokens=False)["input_ids"]:
                if regex.match(model.tokenizer.decode([tid])) and tid not in seen[side]:
                    seen[side].append(int(tid))
    if not seen["protected"] and not seen["legitimate"]:
        raise ValueError("no word tokens in the pairs' phrases")
    protected, legitimate = set(seen["protected"]), set(seen["legitimate"])
    return PhraseVocabulary(
        protected_only=[t for t in seen["protected"] if t not in legitimate],
        legitimate_only=[t for t in seen["legitimate"] if t not in protected],
        shared=[t for t in seen["protected"] if t in legitimate],
    )


# ---------------------------------------------------------------------------------------------------------
# Tokens chosen from the vocabulary
# ---------------------------------------------------------------------------------------------------------


def frequent_token_ids(model: LoadedModel, n: int = 3000, pattern: str = r"^ [A-Za-z]{2,}$") -> list[int]:
    """The first ``n`` token ids whose decoded text matches ``pattern`` (default: a space then a whole word).

    Vocabulary subset for circuit tables. There is no token-frequency table offline, so *id order stands in
    for frequency*: byte-level BPE vocabularies (GPT-2's and SmolLM2's) list merges in the order they were
    learnt, most frequent pairs first, so low ids are, roughly, common tokens. The word pattern keeps the
    tables readable (no punctuation or special tokens). It cannot tell a whole word from an early merge that
    is usually absorbed into longer tokens (`` strugg``, `` affili`` in SmolLM2): such tokens are rarely the
    next token, have atypical unembeddings, and can dominate circuit tables.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    regex = re.compile(pattern)
    special = set(model.tokenizer.all_special_ids) | set(getattr(model.tokenizer, "added_tokens_decoder", {}) or {})
    out = []
    for tid in range(model.cfg.d_vocab):
        if tid in special:
            continue
        if regex.match(model.tokenizer.decode([tid])):
            out.append(tid)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} tokens of {model.name} match {pattern!r}; asked for n={n}")
