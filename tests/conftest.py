"""Shared fixtures: ``xp``, the array module of each device a test runs on.

A test that takes ``xp`` runs once on NumPy ("cpu") and once on CuPy ("gpu").
The gpu run carries the ``gpu`` mark (deselect with ``-m 'not gpu'``) and is
skipped, with the reason, where CuPy or a CUDA GPU is missing.
"""

import pytest

from tinyddpm.backend import array_module, gpu_unavailable_reason


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def xp(request):
    if request.param == "gpu":
        reason = gpu_unavailable_reason()
        if reason is not None:
            pytest.skip(f"gpu: {reason}")
    return array_module(request.param)


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory):
    """96 built-in digits written as a class-folder tree, like DigitsData (for training tests)."""
    from PIL import Image

    from tinyddpm.digits import make_digits

    root = tmp_path_factory.mktemp("digits")
    images, labels = make_digits(seed=0, per_class=10)
    for i, (image, label) in enumerate(zip(images[:96], labels[:96])):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / str(label) / f"{i}.png")
    return str(root)
