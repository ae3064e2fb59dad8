"""The one token-id check every analysis uses: each kind of bad argument, named."""

import pytest
import torch

from mechfin_utils.core.inputs import check_token_pairs, check_tokens


def test_good_tokens_pass_unchanged():
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert check_tokens(tokens, 10) is tokens


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (["a prompt"], TypeError, r"tokens must be a \[batch, pos\] tensor of token ids .* got list"),
        (torch.tensor([1, 2, 3]), ValueError, r"non-empty \[batch, pos\].*shape \(3,\)"),
        (torch.zeros(2, 3), ValueError, r"integer tensor .* dtype torch.float32"),
        (torch.zeros(0, 3, dtype=torch.long), ValueError, r"non-empty"),
        (
            torch.tensor([[1, 2], [3, 10]]),
            ValueError,
            r"tokens\[1, 1\] = 10 is not a token id of toy \(vocabulary size 10\)",
        ),
        (torch.tensor([[1, -1], [3, 4]]), ValueError, r"tokens\[0, 1\] = -1"),
    ],
)
def test_each_bad_argument_is_named(bad, error, message):
    with pytest.raises(error, match=message):
        check_tokens(bad, 10, model_name="toy")


def test_pairs_name_the_bad_run_and_a_shape_mismatch():
    good = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="corrupted_tokens must be an integer tensor"):
        check_token_pairs(good, good.float(), 10)
    with pytest.raises(TypeError, match="clean_tokens"):
        check_token_pairs([1, 2, 3], good, 10)
    with pytest.raises(ValueError, match=r"clean_tokens has shape \(1, 3\) but corrupted_tokens has \(1, 2\)"):
        check_token_pairs(good, good[:, :2], 10)
