"""A small digit classifier, built from tinyddpm's own layers, that `evaluate` measures with.

Its 128-d pooled features play the role Inception features play in FID: the
Fréchet distance between the features of generated and real images says how
far apart the two sets are. It is trained once on the built-in digits (seed 0,
the set the diffusion model learns) and scored on a held-out set made with
another seed (same fonts, fresh random transforms), then cached.

x (N, 32, 32, C) in [-1, 1] -> logits (N, K); ``features`` (N, 128).
"""

import hashlib
import json

import numpy as np

from tinyddpm.backend import to_device, to_host
from tinyddpm.checkpoint import atomic_write
from tinyddpm.nn import Conv2d, GlobalAvgPool, GroupNorm, Linear, Module, SoftmaxCrossEntropy, Swish, no_grad
from tinyddpm.optim import Adam

CLASSIFIER_VERSION = 2
TRAIN_SEED, HELD_OUT_SEED = 0, 1  # the digits seeds of the training and held-out sets


class DigitClassifier(Module):
    """Three 3x3 convs (32, 64, 128 channels; the last two stride 2), pooling, a linear layer."""

    def __init__(self, channels=1, num_classes=10, rng=None, dtype=np.float32):
        rng = np.random.default_rng(0) if rng is None else rng
        self.conv1 = Conv2d(channels, 32, 3, rng=rng, dtype=dtype)
        self.conv1.needs_input_grad = False
        self.norm1 = GroupNorm(8, 32, dtype=dtype)
        self.act1 = Swish()
        self.conv2 = Conv2d(32, 64, 3, stride=2, rng=rng, dtype=dtype)
        self.norm2 = GroupNorm(8, 64, dtype=dtype)
        self.act2 = Swish()
        self.conv3 = Conv2d(64, 128, 3, stride=2, rng=rng, dtype=dtype)
        self.norm3 = GroupNorm(8, 128, dtype=dtype)
        self.act3 = Swish()
        self.pool = GlobalAvgPool()
        self.fc = Linear(128, num_classes, rng=rng, dtype=dtype)

    def features(self, x):
        h = self.act1(self.norm1(self.conv1(x)))
        h = self.act2(self.norm2(self.conv2(h)))
        h = self.act3(self.norm3(self.conv3(h)))
        return self.pool(h)

    def forward(self, x):
        return self.fc(self.features(x))

    def backward(self, dlogits):
        dh = self.pool.backward(self.fc.backward(dlogits))
        dh = self.conv3.backward(self.norm3.backward(self.act3.backward(dh)))
        dh = self.conv2.backward(self.norm2.backward(self.act2.backward(dh)))
        self.conv1.backward(self.norm1.backward(self.act1.backward(dh)))
        return None


def predict(classifier, images, batch_size=500):
    """``(features (N, 128), probabilities (N, K))`` as host arrays, in batches."""
    xp = classifier.array_module()
    features, probs = [], []
    with no_grad():
        for start in range(0, len(images), batch_size):
            f = classifier.features(to_device(images[start:start + batch_size], xp))
            logits = classifier.fc(f)
            e = xp.exp(logits - logits.max(axis=1, keepdims=True))
            features.append(to_host(f))
            probs.append(to_host(e / e.sum(axis=1, keepdims=True)))
    return np.concatenate(features), np.concatenate(probs)


def train_classifier(images, labels, xp=np, epochs=6, batch_size=128, lr=3e-3, seed=0, log=None):
    """Train a :class:`DigitClassifier` on (N, 32, 32, C) images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    classifier = DigitClassifier(images.shape[-1], int(labels.max()) + 1, rng=rng).to(xp)
    optimizer = Adam(classifier.parameters(), lr=lr)
    loss_fn = SoftmaxCrossEntropy()
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(images) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            x = to_device(_jitter(images[batch], rng), xp)
            classifier.zero_grad()
            loss = loss_fn(classifier(x), to_device(labels[batch], xp))
            classifier.backward(loss_fn.backward()[0])
            optimizer.step()
        if log:
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss:.4f}")
    return classifier


def _jitter(images, rng, max_shift=2):
    """Shift each image by up to ``max_shift`` pixels (zero fill at -1), so features do not
    depend on exact placement."""
    out = np.full_like(images, -1.0)
    N, H, W, _ = images.shape
    for i, (dy, dx) in enumerate(rng.integers(-max_shift, max_shift + 1, size=(N, 2))):
        out[i, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
            images[i, max(-dy, 0):H - max(dy, 0), max(-dx, 0):W - max(dx, 0)]
    return out


def load_or_train_classifier(xp=np, log=None):
    """The cached classifier for the built-in digits, trained on first use.

    Returns ``(classifier, info)`` with ``info["held_out_accuracy"]``.
    """
    from safetensors.numpy import load_file, save

    from tinyddpm.datasets import load_dataset
    from tinyddpm.digits import _cache_key, default_cache_dir

    train_set = load_dataset(seed=TRAIN_SEED)
    key = hashlib.sha256(f"{CLASSIFIER_VERSION} {_cache_key(TRAIN_SEED, 1000)}".encode()).hexdigest()[:12]
    path = default_cache_dir() / f"classifier-v{CLASSIFIER_VERSION}-{key}.safetensors"
    info_path = path.with_suffix(".json")
    classifier = DigitClassifier()
    if path.is_file() and info_path.is_file():
        classifier.load_state_dict(load_file(path))
        return classifier.to(xp), json.loads(info_path.read_text())

    if log:
        log("training the evaluation classifier on the built-in digits (once; cached in "
            f"{path.parent})")
    classifier = train_classifier(train_set.images, train_set.labels, xp=xp, log=log)
    held_out = load_dataset(seed=HELD_OUT_SEED)
    _, probs = predict(classifier, held_out.images)
    info = {"held_out_accuracy": float((probs.argmax(1) == held_out.labels).mean()),
            "held_out_images": len(held_out.images), "train_seed": TRAIN_SEED, "held_out_seed": HELD_OUT_SEED}
    atomic_write(path, save(classifier.state_dict()))
    atomic_write(info_path, json.dumps(info, indent=1).encode())
    return classifier, info

