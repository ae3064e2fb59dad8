"""The tokenizer of the models trained on synthetic facts: the world's words whole, its invented names in pieces.

Choice, and why. The models of notebook 13 are trained from scratch on :mod:`mechfin_utils.tasks.synthetic_facts`
only, so their tokenizer needs the vocabulary of that text and nothing else. SmolLM2's 49,152-token vocabulary
would make the embedding and the unembedding 95% of a 1.5M-parameter model and most of its training time, for
tokens it never sees. This one is a WordPiece vocabulary written down from the generator's tables
(:func:`build_fact_tokenizer`):

* every word of the templates and every object is one token (so every answer is one token, as the score needs);
* every name onset (``"Bra"``) and every name syllable as a continuation piece (``"##vik"``) is a token, and no
  whole name is: an invented subject is two or three tokens, as real names are to real tokenizers, so causal tracing
  has a first, middle and last subject token;
* ``[BOS]`` starts every text (the models' BOS decision), ``[PAD]`` pads, ``[UNK]`` marks anything else;
* splitting on spaces and punctuation, case kept. Character offsets come back for every piece, which
  :func:`mechfin_utils.tasks.facts.locate_subject` uses to find a subject's span.

It is a ``PreTrainedTokenizerFast``: saved beside the weights and loaded with ``AutoTokenizer.from_pretrained``.
:func:`check_world_tokenisation` verifies that every subject is the pieces it was built from and every object one
token, naming the first subject or object that is not.
"""

from __future__ import annotations

from typing import Any

from mechfin_utils.tasks.synthetic_facts import NAME_ONSETS, NAME_SYLLABLES, FactWorld

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
PUNCTUATION = (".", ",")
CONTINUATION = "##"


def fact_vocabulary(world: FactWorld) -> list[str]:
    """The tokens, in id order: special tokens, punctuation, the world's words, name onsets, name syllables."""
    tokens = [*SPECIAL_TOKENS.values(), *PUNCTUATION]
    tokens += [w for w in world.words() if w not in tokens]
    tokens += [o for o in NAME_ONSETS if o not in tokens]
    tokens += [CONTINUATION + s for s in NAME_SYLLABLES]
    return tokens


def build_fact_tokenizer(world: FactWorld) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` over :func:`fact_vocabulary` (typed ``Any``: transformers is read
    untyped here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(fact_vocabulary(world))}
    core = Tokenizer(
        models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix=CONTINUATION)
    )
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def check_world_tokenisation(tokenizer: Any, world: FactWorld) -> None:
    """A ValueError naming the first subject that is not 2-3 known pieces, or object that is not one token."""
    unk = tokenizer.unk_token_id
    for subject in world.subjects:
        ids = tokenizer(subject, add_special_tokens=False)["input_ids"]
        if not 2 <= len(ids) <= 3 or unk in ids:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"subject {subject!r} tokenises to {pieces}: expected 2-3 known pieces")
    for relation in world.relations:
        for obj in relation.objects:
            ids = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or unk in ids:
                raise ValueError(f"relation {relation.name!r}: object {obj!r} is not one known token ({ids})")
