"""Training: the example's recipe, with checkpoints, logs, previews and resume.

Randomness is counter-based: the shuffle of epoch ``e`` comes from
``default_rng([seed, 0, e])`` and the steps and noise of update ``s`` from
``default_rng([seed, 1, s])``. Nothing but the update count needs saving to
resume, and a resumed run draws exactly what an uninterrupted one would.

Given a :class:`~tinyddpm.distributed.ProcessGroup`, training is data-parallel:
every rank draws the same global batch and trains on its own rows of it, the
gradients are summed over the ranks, and rank 0 alone writes files and logs.
The same seed gives the same run for any number of ranks, up to float32
rounding.
"""

import csv
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tinyddpm import cuda_graph
from tinyddpm.backend import array_module, get_array_module, to_device
from tinyddpm.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from tinyddpm.datasets import DataError, load_dataset
from tinyddpm.diffusion import linear_schedule, q_sample, sample_timesteps
from tinyddpm.ema import EMA
from tinyddpm.images import save_grid
from tinyddpm.nn import MSELoss, array_cache
from tinyddpm.optim import Adam
from tinyddpm.sampling import ancestral_sample
from tinyddpm.unet import UNet, preset

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainOptions:
    """Everything that defines a training run; the defaults are the example's recipe."""

    preset: str = "example"
    epochs: int | None = 50  # None on resume: as many as the run was started with
    batch_size: int = 128
    learning_rate: float = 5e-4
    seed: int = 0
    data: str | None = None  # None: the built-in digits
    channels: int | None = None  # None: inferred from the data
    num_steps: int = 500  # T
    preview_every: int = 1  # epochs between 16-image previews (0: never)
    conditional: bool = False  # learn p(x | label) from the folder labels
    label_dropout: float = 0.1  # share of labels replaced by "no label" (classifier-free guidance)
    ema_decay: float | None = None  # keep a moving average of the weights with this decay
    max_steps: int | None = None  # stop early after this many updates (for quick runs)


def epoch_order(seed, epoch, num_images):
    return np.random.default_rng([seed, 0, epoch]).permutation(num_images)


def step_rng(seed, step):
    return np.random.default_rng([seed, 1, step])


def train_step(model, optimizer, loss_fn, schedule, x0, t, noise, labels=None):
    """One update: noise the batch to steps ``t``, predict the noise, Adam step. Returns the
    loss as a scalar on the device, so that nothing waits for the GPU until it is read."""
    x_t = q_sample(schedule, x0, t, noise)
    loss = _loss_and_gradients(model, loss_fn, x_t, t, noise, labels)
    optimizer.step()
    return loss


class TrainStep:
    """:func:`train_step` for one model, optimiser, loss and schedule: ``step(x0, t, noise, labels)``.

    On the GPU the update is recorded as a CUDA graph (``cuda_graph.py``) after one eager
    step, and replayed by every later step of the same batch shape: everything from the
    noised batch on (gradients, loss, Adam's update of every parameter), with only the
    noising and the copies of the step's inputs launched from Python. ``optimizer.advance()``
    sets the step's Adam step size on the device before each replay. If the update cannot
    be recorded, training warns once and goes on eagerly; ``TINYDDPM_CUDA_GRAPHS=0`` turns
    recording off.
    """

    def __init__(self, model, optimizer, loss_fn, schedule):
        self.model, self.optimizer, self.loss_fn, self.schedule = model, optimizer, loss_fn, schedule
        self.graph = None
        self.record = cuda_graph.CUDA_GRAPHS

    def __call__(self, x0, t, noise, labels=None):
        xp = get_array_module(x0)
        if xp is np or not self.record:
            return train_step(self.model, self.optimizer, self.loss_fn, self.schedule, x0, t, noise, labels)
        x_t = q_sample(self.schedule, x0, t, noise)
        t = to_device(t, xp)
        labels = None if labels is None else to_device(labels, xp)
        inputs = (x_t, t, noise, labels)
        self.optimizer.advance()
        if self.graph is None:
            loss = self._update(*inputs)  # compiles the kernels the recording needs
            self.graph = cuda_graph.recorded_or_warn(lambda: cuda_graph.CapturedCall(self._update, *inputs),
                                                     "training", "the update")
            self.record = self.graph is not None
            # The eager step's arrays are free now, kept by CuPy's pool; the graph has its own.
            xp.get_default_memory_pool().free_all_blocks()
            return loss
        if not self._fits(inputs):  # another batch shape: eagerly
            return self._update(*inputs)
        return self.graph(*inputs)

    def _update(self, x_t, t, noise, labels):
        loss = _loss_and_gradients(self.model, self.loss_fn, x_t, t, noise, labels)
        self.optimizer.update()
        return loss

    def _fits(self, inputs):
        return all((a is None) == (b is None) and (a is None or a.shape == b.shape)
                   for a, b in zip(self.graph.inputs, inputs))


def data_parallel_step(group, model, optimizer, loss_fn, schedule, x0, t, noise, labels, stop):
    """:func:`train_step` on this rank's equal share of a global batch of B images.

    ``MSELoss`` averages over the rank's B / N images; weighting it by 1 / N makes
    each rank's loss its summed squared error over 2B. Summed over the ranks,
    losses and gradients are then exactly those of the whole batch, and every
    rank takes the same Adam step. ``stop`` (a Ctrl-C on this rank) is summed
    with them. Returns the batch's loss and whether any rank asked to stop.
    """
    share = 1.0 / group.size
    loss = _loss_and_gradients(model, loss_fn, q_sample(schedule, x0, t, noise), t, noise, labels, weight=share)
    loss, stop = group.sum_gradients(model.parameters(), loss, stop)
    optimizer.step()
    return loss, stop


def _loss_and_gradients(model, loss_fn, x_t, t, noise, labels, weight=1.0):
    """Predict the noise in the noised batch ``x_t``; fill ``param.grad`` for ``weight`` times the loss."""
    model.zero_grad()
    loss = loss_fn(model(x_t, t, labels), noise)
    model.backward(loss_fn.backward(weight))
    return loss * weight


class _StopRequest:
    """Turns the first Ctrl-C into a request to stop after the current update.

    With ``agreed`` (a distributed run) the Ctrl-C only sets ``signalled``; the
    training loop sets ``requested`` once the ranks have shared their flags, so
    that all of them stop after the same update.
    """

    def __init__(self, agreed=False):
        self.requested = self.signalled = False
        self.agreed = agreed

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signalled:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signalled = True
        if not self.agreed:
            self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(options, out_dir, device="cpu", resume=False, progress=True, log=print, group=None):
    """Train (or resume) and return a dict summary; everything is written under ``out_dir``.

    With a process ``group`` (from :func:`tinyddpm.distributed.init`) this rank
    trains its share of each batch, and only rank 0 logs and writes. An error on
    any rank stops every rank.
    """
    if group is None:
        return _train(options, out_dir, device, resume, progress, log, None)
    with group.abort_on_error():
        if not group.is_root:
            progress, log = False, lambda *_: None
        return _train(options, out_dir, device, resume, progress, log, group)


def _train(options, out_dir, device, resume, progress, log, group):
    xp = array_module(device)
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME

    resumed = None
    if resume:
        resumed = load_checkpoint(checkpoint_path)
        # The run's own options, but this call's stopping point (epochs only if given).
        saved = TrainOptions(**resumed.train["options"])
        options = replace(saved, epochs=options.epochs or saved.epochs, max_steps=options.max_steps)

    dataset = load_dataset(options.data, channels=options.channels)
    config = preset(options.preset, channels=dataset.images.shape[-1])
    if options.conditional:
        if dataset.labels is None:
            raise DataError(f"--conditional needs labelled data (class subfolders); {dataset.source} has none")
        config = replace(config, num_classes=len(dataset.class_names))
    model = UNet(config, rng=np.random.default_rng([options.seed, 2])).to(xp)
    optimizer = Adam(model.parameters(), lr=options.learning_rate)
    ema = EMA(model.parameters(), options.ema_decay) if options.ema_decay else None
    step = 0
    if resumed is not None:
        if resumed.model_config != config:
            raise CheckpointError(f"{checkpoint_path} holds a {resumed.model_config} network, expected {config}")
        try:
            model.load_state_dict(resumed.model)
            optimizer.load_state_dict(resumed.adam)
            if ema is not None:
                ema.load_state_dict(resumed.ema)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{checkpoint_path} does not fit the model: {error}") from None
        step = resumed.train["step"]

    images = to_device(dataset.images, xp)
    num_images = len(images)
    steps_per_epoch = num_images // options.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"batch size {options.batch_size} is larger than the {num_images} training images "
                        f"in {options.data or 'the built-in digits'}")
    total_steps = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)
    writing = group is None or group.is_root
    if group is not None:
        rows = group.shard(options.batch_size)  # this rank's rows of every batch
        group.check_same("the number of images and the update to start from", (num_images, step))

    schedule = linear_schedule(options.num_steps)
    loss_fn = MSELoss()
    update = TrainStep(model, optimizer, loss_fn, schedule)
    log_path = out_dir / "loss.csv"
    if writing:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        if step == 0 or not log_path.exists():
            log_path.write_text("step,epoch,iteration,loss,seconds\n")

    def checkpoint():
        save_checkpoint(checkpoint_path, Checkpoint(
            model_config=config, model=model.state_dict(), adam=optimizer.state_dict(),
            ema=ema.state_dict() if ema is not None else None,
            train={"step": step, "epoch": step // steps_per_epoch, "options": asdict(options),
                   "class_names": dataset.class_names}))

    log(f"training {options.preset} network ({model.num_parameters():,} parameters) on {dataset.source}: "
        f"{num_images} images, {steps_per_epoch} updates/epoch, {total_steps} updates, device {device}"
        + (f", {group.size} processes summing gradients by {group.transport}" if group is not None else ""))
    bar = _progress_bar(total_steps, step, progress)
    started, first_step, loss = time.perf_counter(), step, float("nan")
    # Ranks other than 0 write their log rows nowhere.
    with (_StopRequest(agreed=group is not None) as stop, array_cache(),
          open(log_path if writing else os.devnull, "a", newline="") as log_file):
        writer = csv.writer(log_file)
        while step < total_steps and not stop.requested:
            epoch, iteration = divmod(step, steps_per_epoch)
            order = epoch_order(options.seed, epoch, num_images)
            batch = order[iteration * options.batch_size:(iteration + 1) * options.batch_size]
            rng = step_rng(options.seed, step)
            t = sample_timesteps(rng, options.batch_size, options.num_steps)
            noise = rng.standard_normal((options.batch_size, *images.shape[1:]), dtype=np.float32)
            labels = None
            if options.conditional:
                dropped = rng.random(options.batch_size) < options.label_dropout
                labels = np.where(dropped, model.null_label, dataset.labels[batch])
            if group is None:
                loss = float(update(images[to_device(batch, xp)], t, to_device(noise, xp), labels))
            else:
                loss, stop.requested = data_parallel_step(
                    group, model, optimizer, loss_fn, schedule, images[to_device(batch[rows], xp)], t[rows],
                    to_device(noise[rows], xp), None if labels is None else labels[rows], stop.signalled)
            if ema is not None:
                ema.update()
            step += 1
            elapsed = time.perf_counter() - started
            writer.writerow([step, epoch + 1, iteration + 1, f"{loss:.6f}", f"{elapsed:.2f}"])
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch + 1}/{options.epochs}", loss=f"{loss:.4f}",
                            img_s=f"{(step - first_step) * options.batch_size / elapsed:.1f}")
            if writing and (step % steps_per_epoch == 0 or step == total_steps):
                log_file.flush()
                checkpoint()
                _save_loss_curve(log_path, out_dir / "loss.png")
                epoch_done = step // steps_per_epoch
                if options.preview_every and (epoch_done % options.preview_every == 0 or step == total_steps):
                    preview_labels = np.arange(16) % config.num_classes if options.conditional else None
                    preview, _ = ancestral_sample(model, schedule, np.random.default_rng([options.seed, 3, step]),
                                                  16, labels=preview_labels)
                    save_grid(preview, out_dir / "samples" / f"step_{step:06d}.png", ncols=4)
        bar.close()
        if stop.requested:
            log_file.flush()
            if writing:
                checkpoint()
            log(f"interrupted: checkpoint saved at update {step} in {checkpoint_path}; continue with --resume")
    seconds = time.perf_counter() - started
    return {"steps": step, "final_loss": loss, "seconds": seconds, "checkpoint": str(checkpoint_path),
            "interrupted": stop.requested}


def _progress_bar(total, initial, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True)


def _save_loss_curve(log_path, png_path):
    """Plot loss per update (and a running mean) from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.genfromtxt(log_path, delimiter=",", names=True)
    steps, losses = np.atleast_1d(data["step"]), np.atleast_1d(data["loss"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="loss")
    window = max(1, min(50, len(losses) // 10))
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (MATLAB mse: SSE / 2B)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
