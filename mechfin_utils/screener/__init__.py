"""The fine-tuned fair-lending screener, and how any model's decisions are measured; and every other model mechfin
fine-tunes.

* :mod:`~mechfin_utils.screener.training` trains, caches and cards a screener (``python -m mechfin_utils.screener
  evaluate|train|compare``);
* :mod:`~mechfin_utils.screener.behaviour` and :mod:`~mechfin_utils.screener.baseline` score a model on a task set
  (accuracy, AUROC, calibration, per basis, controls);
* :mod:`~mechfin_utils.screener.report` writes the one-page offline compliance report;
* :mod:`~mechfin_utils.screener.ordering` fine-tunes SmolLM2 on number ordering (notebook 14), and
  :mod:`~mechfin_utils.screener.fine_tune_cache` is how every fine-tuned model is cached and carded.

Importing this package (which ``import mechfin_utils`` does) registers the fine-tuned models' loader with
:func:`mechfin_utils.core.models.load_model`, so ``load_model("smollm2-135m-screener")`` trains on first use.
"""

from __future__ import annotations

import os

from mechfin_utils.core import models as _models


def _load_screener(
    base: str, recipe: str, *, gpt2_path: str | os.PathLike | None, verbose: bool
) -> _models.LoadedModel:
    if (base, recipe) in _models.ORDERING_MODELS.values():  # notebook 14's number-ordering fine-tune
        from mechfin_utils.screener.ordering import load_ordering_model

        return load_ordering_model(base, recipe, verbose=verbose)
    from mechfin_utils.screener.training import load_screener  # training pulls in the optimiser: only when asked

    return load_screener(base, recipe, gpt2_path=gpt2_path, verbose=verbose)


_models.register_fine_tuned_loader(_load_screener)
