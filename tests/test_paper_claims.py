"""The paper's GPT-2 Small claims: held once, read back in words exactly as the paper states them."""

import math

from mechfin_utils.tasks import paper_claims


def test_claims_read_back_as_the_paper_states_them():
    assert paper_claims.describe(paper_claims.HEAD_DLA) == "positive 11.4, 8.9, 6.3; negative 0.6, 11.0, 10.7"
    assert paper_claims.describe(paper_claims.HEAD_PATCHING) == "positive 10.2, 10.7, 11.3; negative 9.6, 10.6"
    assert paper_claims.describe(paper_claims.LAYER_DLA) == "positive MLP 2, MLP 4; negative MLP 10, attention layer 0"
    assert paper_claims.describe({}) == ""


def test_probability_ratio_is_e_to_the_mean_logit_difference():
    assert abs(math.exp(paper_claims.MEAN_LOGIT_DIFF) - paper_claims.PROBABILITY_RATIO) < 0.015  # rounding of 0.81


def test_every_head_label_names_a_gpt2_small_head():
    for label in [*paper_claims.HEAD_DLA, *paper_claims.HEAD_PATCHING]:
        layer, head = map(int, label.split("."))
        assert 0 <= layer < 12 and 0 <= head < 12
    assert set(paper_claims.GREATER_THAN_MLPS) <= set(range(12))
