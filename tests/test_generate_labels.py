"""The labels `difflab sample` draws: cycling over the classes, one class, or an error."""

import pytest
import torch

from difflab.generate import _labels


def test_labels_cycle_over_classes_by_default_and_for_all():
    expected = torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(_labels(3, 5, None), expected)
    assert torch.equal(_labels(3, 5, "all"), expected)
    assert torch.equal(_labels(3, 4, "2"), torch.full((4,), 2))


def test_unconditional_model_takes_no_label():
    assert _labels(None, 4, None) is None
    for label in ("all", "3", 3):
        with pytest.raises(ValueError, match="needs a class-conditional run or a classifier"):
            _labels(None, 4, label)


@pytest.mark.parametrize(
    "label,message", [("10", "outside the classes; valid labels are 0..9"), ("x", "class index or 'all'")]
)
def test_bad_labels(label, message):
    with pytest.raises(ValueError, match=message):
        _labels(10, 4, label)
