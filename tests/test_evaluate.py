"""The Fréchet distance and the scores built on it."""

import numpy as np
import pytest

from tinyddpm.evaluate import frechet_distance, score_images


def test_identical_sets_give_zero():
    f = np.random.default_rng(0).standard_normal((500, 8))
    assert abs(frechet_distance(f, f)) < 1e-8


def test_matches_the_closed_form_for_gaussians():
    """Between N(mu_a, diag(s_a^2)) and N(mu_b, diag(s_b^2)): |mu_a - mu_b|^2 + sum (s_a - s_b)^2."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200_000, 3)) * [1.0, 2.0, 0.5]
    b = rng.standard_normal((200_000, 3)) * [2.0, 2.0, 1.0] + [1.0, 0.0, -2.0]
    expected = (1 + 0 + 4) + (1 + 0 + 0.25)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_shifted_sets_score_worse_and_grow_with_the_shift():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((1000, 16))
    near = rng.standard_normal((1000, 16)) + 0.1
    far = rng.standard_normal((1000, 16)) + 1.0
    d_same = frechet_distance(real, rng.standard_normal((1000, 16)))
    assert d_same < frechet_distance(real, near) < frechet_distance(real, far)
    assert frechet_distance(real, far) == pytest.approx(16.0, rel=0.1)


def test_score_images_reports_every_score():
    from tinyddpm.classifier import DigitClassifier

    rng = np.random.default_rng(3)
    classifier = DigitClassifier(rng=rng)
    real = rng.uniform(-1, 1, (60, 32, 32, 1)).astype(np.float32)
    scores = score_images(classifier, real[:20], real[20:], requested=np.zeros(20, int))
    assert scores["num_images"] == 20 and sum(scores["class_histogram"]) == 20
    assert 0.1 <= scores["mean_confidence"] <= 1.0
    assert 0.0 <= scores["requested_class_rate"] <= 1.0
    with pytest.raises(ValueError, match="held-out"):
        score_images(classifier, real[:40], real[40:])


def test_held_out_prefixes_hold_every_class():
    from tinyddpm.classifier import HELD_OUT_SEED
    from tinyddpm.datasets import load_dataset
    from tinyddpm.evaluate import held_out_real_images

    images = held_out_real_images()
    data = load_dataset(seed=HELD_OUT_SEED)
    order = np.random.default_rng(HELD_OUT_SEED).permutation(len(images))
    counts = np.bincount(data.labels[order][:200], minlength=10)
    assert counts.min() >= 8  # about 20 of each class in the first 200
    np.testing.assert_array_equal(images[:5], data.images[order[:5]])
