"""The paper's GPT-2 Small claims: held once, read back in words as the paper states them, heads labelled "L10H7"."""

import math

from mechfin_utils.core.head_labels import parse_head
from mechfin_utils.tasks import paper_claims


def test_claims_read_back_as_the_paper_states_them():
    assert paper_claims.describe(paper_claims.HEAD_DLA) == "positive L11H4, L8H9, L6H3; negative L0H6, L11H0, L10H7"
    assert paper_claims.describe(paper_claims.HEAD_PATCHING) == "positive L10H2, L10H7, L11H3; negative L9H6, L10H6"
    assert paper_claims.describe(paper_claims.LAYER_DLA) == "positive MLP 2, MLP 4; negative MLP 10, attention layer 0"
    assert paper_claims.describe({}) == ""


def test_probability_ratio_is_e_to_the_mean_logit_difference():
    assert abs(math.exp(paper_claims.MEAN_LOGIT_DIFF) - paper_claims.PROBABILITY_RATIO) < 0.015  # rounding of 0.81


def test_every_head_label_names_a_gpt2_small_head():
    ioi_heads = [label for heads in paper_claims.IOI_HEADS.values() for label in heads]
    for label in [*paper_claims.HEAD_DLA, *paper_claims.HEAD_PATCHING, *ioi_heads]:
        parse_head(label, n_layers=12, n_heads=12)  # raises unless an "L<layer>H<head>" label of a 12 x 12 model
    assert set(paper_claims.GREATER_THAN_MLPS) <= set(range(12))
