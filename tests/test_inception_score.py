"""The classifier Inception Score: known values, split rules, the optional torchmetrics Inception path."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.inception_score import (auto_splits, classifier_probabilities, inception_available, inception_score,
                                        torchmetrics_inception)


def test_confident_uniform_output_scores_the_number_of_classes():
    for classes, splits in ((10, 1), (10, 10), (3, 4)):
        probs = torch.eye(classes).repeat(splits * 5, 1)  # each split holds every class equally often
        mean, std = inception_score(probs, splits)
        assert mean == pytest.approx(classes, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_constant_output_scores_one():
    probs = torch.softmax(torch.randn(1, 10, generator=torch.Generator().manual_seed(0)), 1).repeat(200, 1)
    assert inception_score(probs, 10)[0] == pytest.approx(1.0, abs=1e-12)
    assert inception_score(torch.full((100, 10), 0.1), 1)[0] == pytest.approx(1.0, abs=1e-12)


def test_a_mixture_gives_exp_of_the_mutual_information():
    """Half the images certainly class 0, half (½, ½) over classes 0 and 1: p(y) = (¾, ¼)."""
    probs = torch.tensor([[1.0, 0.0]] * 50 + [[0.5, 0.5]] * 50)
    kl = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert inception_score(probs, 1)[0] == pytest.approx(math.exp(kl), rel=1e-12)


def test_split_std_is_the_spread_over_splits():
    confident = torch.eye(10).repeat(10, 1)  # IS 10
    constant = torch.full((100, 10), 0.1)  # IS 1
    mean, std = inception_score(torch.cat([confident, constant]), 2)
    assert mean == pytest.approx(5.5) and std == pytest.approx(torch.tensor([10.0, 1.0]).std().item())
    halves = torch.eye(2)[[0] * 10 + [1] * 10]  # each split sees one class only: its own p(y) is that class
    assert inception_score(halves, 2) == (pytest.approx(1.0), pytest.approx(0.0))
    assert inception_score(halves, 1)[0] == pytest.approx(2.0)


def test_too_few_images_for_the_splits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"10 split\(s\) needs at least 100 images .*got 99"):
        inception_score(torch.eye(10).repeat(10, 1)[:99], 10)
    with pytest.raises(ValueError, match="positive whole number"):
        inception_score(torch.eye(10), 0)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        inception_score(torch.ones(10), 1)


def test_automatic_splits():
    assert auto_splits(5) == 0  # fewer images than classes: no score
    assert auto_splits(40) == 1 and auto_splits(199) == 1  # one split, no spread
    assert auto_splits(200) == 2 and auto_splits(1000) == 10 and auto_splits(50_000) == 10


def test_the_classifier_scores_real_digits_well_and_noise_poorly():
    from data.sources import mnist_digits
    from evaluation.classifier import load_classifier

    model = load_classifier()
    digits, _ = mnist_digits("test", 200)
    real = inception_score(classifier_probabilities(model, digits), 1)[0]
    noise = inception_score(classifier_probabilities(model, torch.rand(200, 1, 32, 32) * 2 - 1), 1)[0]
    assert real > 6.0 and noise < 3.0  # label smoothing (0.05) keeps real digits below 10 (docs/likelihood.md)


def test_torchmetrics_inception_is_skipped_with_a_note_when_weights_are_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    note = inception_available()
    assert note is not None and note.startswith("torchmetrics Inception IS/FID skipped") and "\n" not in note
    results, note2 = torchmetrics_inception(torch.zeros(4, 1, 32, 32), torch.zeros(4, 1, 32, 32))
    assert results == {} and note2 == note
