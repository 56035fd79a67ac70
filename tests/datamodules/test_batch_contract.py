"""The batch contract (named fields, positional tuples accepted) and the separate normalization step."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from lit_methods.datamodules import Normalize, as_batch


def test_named_batches_pass_through_and_tuples_get_names():
    x, y, g = torch.zeros(4, 3, 8, 8), torch.arange(4), torch.ones(4)
    named = {"inputs": x, "targets": y, "subgroup": g}
    assert as_batch(named) == named and as_batch(named) is not named
    assert as_batch((x, y)) == {"inputs": x, "targets": y}
    assert as_batch([x]) == {"inputs": x}
    assert as_batch(x) == {"inputs": x}
    assert as_batch({"views": [x, x], "targets": y})["views"][1] is x


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ((torch.zeros(1), torch.zeros(1), torch.zeros(1)), "got 3 fields"),
        ({"images": torch.zeros(1)}, "got the fields ['images']"),
        ("not a batch", "<class 'str'>"),
    ],
)
def test_ambiguous_or_unnamed_batches_are_refused(batch, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        as_batch(batch)


def test_normalize_equals_torchvision_and_inverts():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    pixels = torch.rand(5, 3, 6, 7)
    normalize = Normalize(mean, std)
    expected = v2.Normalize(list(mean), list(std))(pixels)
    torch.testing.assert_close(normalize(pixels), expected)
    torch.testing.assert_close(normalize.inverse(normalize(pixels)), pixels)
    assert not normalize.state_dict()  # hyper-parameters, not weights


@pytest.mark.parametrize(
    ("mean", "std", "shape", "message"),
    [
        ((0.5, 0.5), (0.2,), (1, 2, 4, 4), "mean has 2 channels but std has 1"),
        ((0.5,), (0.0,), (1, 1, 4, 4), "std must be positive"),
        ((0.5,), (0.2,), (1, 3, 4, 4), r"expected \(N, 1, H, W\) images, got shape \(1, 3, 4, 4\)"),
    ],
)
def test_normalize_refuses_bad_values(mean, std, shape, message):
    with pytest.raises(ValueError, match=message):
        Normalize(mean, std)(torch.zeros(shape))
