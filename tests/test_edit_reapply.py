"""Writing a fitted ROME edit again (``edits.reapply``) instead of fitting it a second time, as notebook 09 does with
``edit_convergence``'s reference edits: the same edited weights bit for bit as a fresh fit, and a refusal when the
layer's matrix is no longer the one the edit was fitted on. Random GPT-2 weights: only the mechanics are checked."""

from __future__ import annotations

import pytest
import torch

from mechfin_utils.core import hook_points
from mechfin_utils.methods.editing import edits as editing
from mechfin_utils.methods.editing.edits import ValueParams
from mechfin_utils.methods.editing.key_statistics import KeyCovariance
from mechfin_utils.tasks.counterfact import EditRequest

REQUEST = EditRequest("edit-gpt2", "The capital of France is", "France", " Berlin", " Paris")
LAYER = 2


@pytest.fixture(scope="module")
def identity_covariance(gpt2_random) -> KeyCovariance:
    """C = I: any symmetric positive-definite C gives a valid update; what reapply does does not depend on it."""
    d_mlp = hook_points.output_matrix(gpt2_random, LAYER).shape[1]
    return KeyCovariance(LAYER, torch.eye(d_mlp), n_tokens=d_mlp)


def test_reapplied_edit_gives_the_fitted_weights_bit_for_bit(gpt2_random, identity_covariance):
    params = ValueParams(steps=3)
    with hook_points.restoring(gpt2_random, [LAYER]) as saved:
        fitted = editing.rome(gpt2_random, REQUEST, LAYER, identity_covariance, [""], params)
        edited = hook_points.output_matrix(gpt2_random, LAYER).detach().clone()
    assert torch.equal(hook_points.output_matrix(gpt2_random, LAYER), saved.saved[LAYER])  # restored
    with hook_points.restoring(gpt2_random, [LAYER]):
        assert editing.reapply(gpt2_random, fitted) is fitted
        assert torch.equal(hook_points.output_matrix(gpt2_random, LAYER), edited)
        # a second fit from the same state gives the same weights too: reapplying stands in for refitting exactly
    with hook_points.restoring(gpt2_random, [LAYER]):
        editing.rome(gpt2_random, REQUEST, LAYER, identity_covariance, [""], params)
        assert torch.equal(hook_points.output_matrix(gpt2_random, LAYER), edited)


def test_reapply_refuses_a_matrix_the_edit_was_not_fitted_on(gpt2_random, identity_covariance):
    with hook_points.restoring(gpt2_random, [LAYER]):
        fitted = editing.rome(gpt2_random, REQUEST, LAYER, identity_covariance, [""], ValueParams(steps=2))
    with hook_points.restoring(gpt2_random, [LAYER]):
        editing.reapply(gpt2_random, fitted)
        before = hook_points.output_matrix(gpt2_random, LAYER).detach().clone()
        with pytest.raises(ValueError, match=r"reapply: layer 2's output matrix is not the one edit 'edit-gpt2'"):
            editing.reapply(gpt2_random, fitted)  # on top of itself: not the matrix it was fitted on
        assert torch.equal(hook_points.output_matrix(gpt2_random, LAYER), before)  # refused before writing
