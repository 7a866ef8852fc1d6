"""Sample quality as numbers: Fréchet distance in a digit classifier's feature space, and more.

For N generated images and N held-out real ones:
- ``frechet_distance``: ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)) between Gaussians
  fitted to the classifier's 128-d features (FID's formula, with our classifier for Inception);
- ``real_floor``: the same distance between two disjoint real sets of N: what a perfect model
  would score at this N (the estimate is biased upward for finite N);
- ``class_histogram`` and ``mean_confidence`` (mean top-class probability) of the generated
  images; and for class-conditional sampling, ``requested_class_rate``: the share of images the
  classifier assigns to the class that was asked for.
"""

import numpy as np

from tinyddpm.classifier import HELD_OUT_SEED, predict


def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix via its eigen-decomposition."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (float64)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose argument is symmetric PSD.
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def score_images(classifier, generated, real, requested=None):
    """All the scores of ``generated`` against ``real`` (at least 2N real images, N generated)."""
    n = len(generated)
    if len(real) < 2 * n:
        raise ValueError(f"need {2 * n} held-out real images for {n} generated, have {len(real)}")
    gen_features, gen_probs = predict(classifier, generated)
    real_features, _ = predict(classifier, real[:2 * n])
    predicted = gen_probs.argmax(axis=1)
    scores = {
        "num_images": n,
        "frechet_distance": frechet_distance(gen_features, real_features[:n]),
        "real_floor": frechet_distance(real_features[n:2 * n], real_features[:n]),
        "class_histogram": np.bincount(predicted, minlength=gen_probs.shape[1]).tolist(),
        "mean_confidence": float(gen_probs.max(axis=1).mean()),
    }
    if requested is not None:
        scores["requested_class_rate"] = float((predicted == np.asarray(requested)).mean())
    return scores


def held_out_real_images():
    """The held-out real digits (another seed of the built-in generator), (N, 32, 32, 1),
    in a fixed shuffled order: the set is stored class by class, and every prefix the
    scores take must hold all classes alike."""
    from tinyddpm.datasets import load_dataset

    images = load_dataset(seed=HELD_OUT_SEED).images
    return images[np.random.default_rng(HELD_OUT_SEED).permutation(len(images))]
