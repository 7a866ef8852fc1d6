"""The ``tinyddpm`` command line: train, sample, noise, data, gradcheck."""

import functools
import sys
from pathlib import Path

import click
import numpy as np

from tinyddpm.backend import DEVICES, DeviceError, enable_tf32, keep_freed_memory


def _one_line_errors(command):
    """Report the errors a user can cause as one line, not a traceback."""
    from tinyddpm.checkpoint import CheckpointError
    from tinyddpm.datasets import DataError
    from tinyddpm.distributed import DistributedError

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (DeviceError, DataError, CheckpointError, DistributedError) as error:
            raise click.ClickException(str(error)) from None
    return wrapper


def _load_for_sampling(checkpoint, weights, xp):
    """The checkpoint's network on ``xp``, the schedule it was trained with, and its training info."""
    from tinyddpm.checkpoint import load_model
    from tinyddpm.diffusion import linear_schedule

    model, train_info = load_model(checkpoint, weights)
    schedule = linear_schedule(train_info.get("options", {}).get("num_steps", 500))
    return model.to(xp), schedule, train_info


device_option = click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
                             help="cpu (NumPy) or gpu (CuPy).")


def device_options(command):
    """``--device`` and ``--tf32``; the command itself sees ``device`` only."""

    @device_option
    @click.option("--tf32", is_flag=True,
                  help="GPU only: TF32 tensor-core matrix products (faster; about 1e-3 relative error).")
    @functools.wraps(command)
    def wrapper(*args, tf32, **kwargs):
        if tf32:
            if kwargs["device"] != "gpu":
                raise click.BadParameter("TF32 needs --device gpu", param_hint="--tf32")
            enable_tf32()
        return command(*args, **kwargs)
    return wrapper


@click.group()
@click.version_option(package_name="tinyddpm")
def main():
    """tinyddpm: a hand-written DDPM that learns 32x32 digits (MathWorks' diffusion example)."""
    keep_freed_memory()


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/digits", show_default=True,
              help="Folder for the checkpoint, loss log, loss curve and sample grids.")
@click.option("--preset", type=click.Choice(["example", "small", "tiny"]), default="example", show_default=True,
              help="Network size: 'example' is the MATLAB example's network exactly.")
@click.option("--data", type=click.Path(), default=None,
              help="Image folder (class subfolders allowed) or MNIST IDX file; default: built-in digits.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Force grayscale or RGB.")
@click.option("--epochs", type=int, default=None, help="Passes over the data  [default: 50, or the resumed run's].")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--learning-rate", "--lr", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many updates.")
@click.option("--preview-every", type=int, default=1, show_default=True,
              help="Epochs between 16-image sample grids (0: never).")
@click.option("--conditional", is_flag=True,
              help="Learn one model per class label (folder names) for `sample --digit`.")
@click.option("--label-dropout", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="With --conditional: share of labels dropped, so the model also learns unconditionally.")
@click.option("--ema-decay", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Also keep an exponential moving average of the weights (e.g. 0.999).")
@click.option("--resume", is_flag=True,
              help="Continue from OUT/checkpoint.safetensors with its saved options (--epochs may extend it).")
@click.option("--distributed", is_flag=True,
              help="Data-parallel over the processes of `mpiexec -n N` (one per CPU or GPU), each taking "
                   "1/N of every batch; needs the 'distributed' extra. Without mpiexec: one process.")
@device_options
@_one_line_errors
def train(out_dir, preset, data, channels, epochs, batch_size, learning_rate, seed, max_steps,
          preview_every, conditional, label_dropout, ema_decay, resume, distributed, device):
    """Train a DDPM (the example's recipe by default)."""
    from tinyddpm.distributed import init, launched_ranks
    from tinyddpm.train import TrainOptions, train as run_training

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise click.BadParameter(f"must be at least 1, got {value}", param_hint=name)
    if epochs is None and not resume:
        epochs = TrainOptions.epochs
    options = TrainOptions(preset=preset, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                           seed=seed, data=data, channels=int(channels) if channels else None,
                           preview_every=preview_every, max_steps=max_steps, conditional=conditional,
                           label_dropout=label_dropout, ema_decay=ema_decay)
    group = None
    if distributed:
        group = init(device)
    elif launched_ranks() > 1:
        raise click.UsageError(f"started as one of {launched_ranks()} MPI processes, which would each train alone "
                               "into the same --out: add --distributed")
    result = run_training(options, out_dir, device=device, resume=resume, log=click.echo, group=group)
    if group is None or group.is_root:
        click.echo(f"{result['steps']} updates, final loss {result['final_loss']:.4f}, "
                   f"{result['seconds']:.0f} s; checkpoint {result['checkpoint']}")
    if result["interrupted"]:
        sys.exit(130)


@main.command()
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Checkpoint from `tinyddpm train`; default: the model that ships with tinyddpm.")
@click.option("--num-images", type=int, default=9, show_default=True)
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True,
              help="ddpm: the example's ancestral sampler (every step); ddim: fewer, larger steps.")
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM steps.")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise (0 deterministic, 1 DDPM-like).")
@click.option("--digit", "label", default=None, help="Class to generate (conditional models), e.g. 7.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance w: eps = eps_uncond + w (eps_cond - eps_uncond).")
@click.option("--weights", type=click.Choice(["auto", "model", "ema"]), default="auto", show_default=True,
              help="Trained weights or their moving average (auto: EMA when the checkpoint has it).")
@click.option("--display-every", type=int, default=10, show_default=True,
              help="Save the batch every N sampler steps (0: only the final grid).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="samples", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_options
@_one_line_errors
def sample(checkpoint, num_images, sampler, steps, eta, label, guidance, weights, display_every, out_dir, seed,
           device):
    """Generate images (the example's ancestral sampler by default)."""
    from tinyddpm.backend import array_module
    from tinyddpm.images import make_grid, save_gif, save_grid
    from tinyddpm.sampling import sample as run_sampler

    if num_images < 1:
        raise click.BadParameter(f"must be at least 1, got {num_images}", param_hint="--num-images")
    model, schedule, train_info = _load_for_sampling(checkpoint, weights, array_module(device))
    labels = None
    if label is not None:
        class_names = train_info.get("class_names") or []
        if not model.config.num_classes:
            raise click.UsageError("--digit needs a model trained with --conditional")
        if label not in class_names:
            raise click.BadParameter(f"{label!r} is not one of the model's classes {class_names}",
                                     param_hint="--digit")
        labels = np.full(num_images, class_names.index(label))
    try:
        images, snapshots = run_sampler(model, schedule, np.random.default_rng(seed), num_images, sampler,
                                        steps=steps, eta=eta, labels=labels, guidance=guidance,
                                        display_every=display_every, progress=True)
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    out = Path(out_dir)
    save_grid(images, out / "samples.png")
    if snapshots:
        for t, snapshot in snapshots:
            save_grid(snapshot, out / "steps" / f"t_{t:03d}.png")
        save_gif([make_grid(s, scale=4) for _, s in snapshots], out / "denoising.gif")
    click.echo(f"wrote {out / 'samples.png'}" + (f", {len(snapshots)} step grids and {out / 'denoising.gif'}"
                                                  if snapshots else ""))


@main.command()
@click.option("--data", type=click.Path(), default=None, help="Images to take one from; default: built-in digits.")
@click.option("--index", type=int, default=0, show_default=True, help="Which training image.")
@click.option("--out", type=click.Path(dir_okay=False), default="noise.png", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_one_line_errors
def noise(data, index, out, seed):
    """Show the forward process on one image at t = 0, 100, ..., 500."""
    from tinyddpm.datasets import load_dataset
    from tinyddpm.diffusion import linear_schedule, q_sample
    from tinyddpm.images import save_noise_strip

    dataset = load_dataset(data)
    if not 0 <= index < len(dataset.images):
        raise click.BadParameter(f"must be in 0..{len(dataset.images) - 1}, got {index}", param_hint="--index")
    schedule = linear_schedule()
    steps = list(range(0, schedule.num_steps + 1, 100))
    x0 = dataset.images[index:index + 1]
    eps = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
    frames = [x0[0] if t == 0 else q_sample(schedule, x0, np.array([t]), eps)[0] for t in steps]
    save_noise_strip(np.stack(frames), [f"t = {t}" for t in steps], out)
    click.echo(f"wrote {out}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def data(out_dir, seed):
    """Write the built-in digits as PNGs in class folders 0..9 (the DigitsData layout)."""
    from tinyddpm.digits import export_digits

    export_digits(out_dir, seed=seed)
    click.echo(f"wrote 10,000 digit images to {out_dir}/0 .. {out_dir}/9")


@main.command()
@device_option
@click.option("--seed", type=int, default=0, show_default=True)
@_one_line_errors
def gradcheck(device, seed):
    """Check every layer's hand-written backward against finite differences (float64)."""
    from tinyddpm.backend import array_module
    from tinyddpm.gradcheck import format_table, run_checks

    rows = run_checks(array_module(device), seed=seed)
    click.echo(format_table(rows))
    if not all(row.passed for row in rows):
        sys.exit(1)


@main.command()
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Checkpoint to score; default: the model that ships with tinyddpm.")
@click.option("--num-images", type=int, default=1000, show_default=True)
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddim", show_default=True)
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM steps.")
@click.option("--eta", type=float, default=0.0, show_default=True)
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Conditional models: guidance w, with labels cycling through the classes.")
@click.option("--weights", type=click.Choice(["auto", "model", "ema"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="evaluation.json", show_default=True)
@device_options
@_one_line_errors
def evaluate(checkpoint, num_images, sampler, steps, eta, guidance, weights, seed, out, device):
    """Score generated digits: Fréchet distance in a digit classifier's features, and more."""
    import json

    from tinyddpm.backend import array_module
    from tinyddpm.classifier import load_or_train_classifier
    from tinyddpm.evaluate import held_out_real_images, score_images
    from tinyddpm.sampling import sample as run_sampler

    xp = array_module(device)
    model, schedule, _ = _load_for_sampling(checkpoint, weights, xp)  # fails fast on a bad checkpoint
    classifier, info = load_or_train_classifier(xp, log=click.echo)
    click.echo(f"classifier held-out accuracy {info['held_out_accuracy']:.4f}")
    real = held_out_real_images()
    if not 1 < num_images <= len(real) // 2:
        raise click.BadParameter(f"must be in 2..{len(real) // 2}, got {num_images}", param_hint="--num-images")
    labels = np.arange(num_images) % model.config.num_classes if model.config.num_classes else None
    rng, chunks = np.random.default_rng(seed), []
    for start in range(0, num_images, 250):  # bounded memory: sample 250 at a time
        count = min(250, num_images - start)
        chunks.append(run_sampler(model, schedule, rng, count, sampler, steps=steps, eta=eta, guidance=guidance,
                                  labels=None if labels is None else labels[start:start + count], progress=True)[0])
    generated = np.concatenate(chunks)
    scores = score_images(classifier, generated, real, labels)
    scores.update(classifier_accuracy=info["held_out_accuracy"], sampler=sampler,
                  steps=steps if sampler == "ddim" else schedule.num_steps, eta=eta,
                  guidance=guidance if labels is not None else None, checkpoint=str(checkpoint or "shipped"))
    Path(out).write_text(json.dumps(scores, indent=1))
    click.echo(f"Fréchet distance {scores['frechet_distance']:.3f} (real-vs-real floor {scores['real_floor']:.3f}), "
               f"mean confidence {scores['mean_confidence']:.3f}")
    click.echo(f"class histogram {scores['class_histogram']}")
    if labels is not None:
        click.echo(f"requested digit recognised in {scores['requested_class_rate']:.1%} of samples")
    click.echo(f"wrote {out}")
