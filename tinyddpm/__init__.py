"""tinyddpm: a denoising diffusion probabilistic model written by hand in NumPy/CuPy."""

__version__ = "0.1.0"
