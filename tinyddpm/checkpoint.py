"""Checkpoints: one safetensors file holding everything needed to sample or resume.

Layout (version 1):
- tensors ``model/<name>`` (the weights), ``ema/<name>`` (moving-average weights,
  if kept), ``adam.m/<name>`` and ``adam.v/<name>`` (Adam's moments, if saved);
- metadata (strings): ``format`` = "tinyddpm", ``version``, ``model_config``
  (JSON of :class:`UNetConfig`), ``train`` (JSON: step, epoch, Adam step, the
  training options).

Files are written to a temporary name in the same folder, flushed to disk and
then renamed over the target, so a crash never leaves a half-written checkpoint.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from tinyddpm.unet import UNetConfig

FORMAT = "tinyddpm"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit what it is loaded into."""


@dataclass
class Checkpoint:
    model_config: UNetConfig
    model: dict  # name -> float32 array
    ema: dict | None = None
    adam: dict | None = None  # {"step": int, "m": {name: array}, "v": {name: array}}
    train: dict = field(default_factory=dict)


def save_checkpoint(path, checkpoint):
    """Write ``checkpoint`` to ``path`` atomically."""
    tensors = {f"model/{k}": v for k, v in checkpoint.model.items()}
    if checkpoint.ema is not None:
        tensors.update({f"ema/{k}": v for k, v in checkpoint.ema.items()})
    train = dict(checkpoint.train)
    if checkpoint.adam is not None:
        tensors.update({f"adam.m/{k}": v for k, v in checkpoint.adam["m"].items()})
        tensors.update({f"adam.v/{k}": v for k, v in checkpoint.adam["v"].items()})
        train["adam_step"] = checkpoint.adam["step"]
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "model_config": json.dumps(checkpoint.model_config.to_dict()),
        "train": json.dumps(train),
    }
    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)

    atomic_write(path, data)


def atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` through a flushed temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_metadata(path):
    """The metadata dict of a safetensors file, read from its JSON header."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if not 0 < header_size <= os.path.getsize(path) - 8:
            raise CheckpointError(f"{path} is not a safetensors file (bad header)")
        header = json.loads(f.read(header_size))
    return header.get("__metadata__") or {}


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        metadata = _read_metadata(path)
        tensors = load_file(path)
    except (SafetensorError, ValueError, UnicodeDecodeError, OSError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({str(error).splitlines()[0]})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tinyddpm checkpoint")
    if metadata.get("version") != str(VERSION):
        raise CheckpointError(
            f"{path} has checkpoint version {metadata.get('version')}, this tinyddpm reads version {VERSION}")

    def group(prefix):
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return found or None

    train = json.loads(metadata["train"])
    adam = None
    if group("adam.m/") is not None:
        adam = {"step": train.pop("adam_step"), "m": group("adam.m/"), "v": group("adam.v/")}
    return Checkpoint(
        model_config=UNetConfig.from_dict(json.loads(metadata["model_config"])),
        model=group("model/") or {},
        ema=group("ema/"),
        adam=adam,
        train=train,
    )


PRETRAINED = Path(__file__).parent / "pretrained" / "digits-small.safetensors"


def load_model(path=None, weights="model"):
    """A :class:`UNet` with the weights of checkpoint ``path`` (default: the shipped model).

    ``weights`` picks the trained weights ("model"), their moving average ("ema"),
    or "auto": the average where the checkpoint has one. Returns ``(model, train_info)``.
    """
    from tinyddpm.unet import UNet

    if path is None:
        if not PRETRAINED.is_file():
            raise CheckpointError("no --checkpoint given and this install has no shipped model")
        path = PRETRAINED
    checkpoint = load_checkpoint(path)
    state = checkpoint.model
    if weights == "auto":
        weights = "ema" if checkpoint.ema is not None else "model"
    if weights == "ema":
        if checkpoint.ema is None:
            raise CheckpointError(f"{path} has no EMA weights (train with --ema-decay)")
        state = checkpoint.ema
    model = UNet(checkpoint.model_config)
    try:
        model.load_state_dict(state)
    except ValueError as error:
        raise CheckpointError(f"{path} does not fit its own network config: {error}") from None
    return model, checkpoint.train
