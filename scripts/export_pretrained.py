"""Make the checkpoint that ships inside the package from a training run.

    python scripts/export_pretrained.py runs/shipped/checkpoint.safetensors

Keeps only what sampling needs: the moving-average weights (or the trained
weights if the run kept no average), stored as the model's weights, with the
network config, class names and training options. Adam's moments are dropped,
which makes the file a third of the size.
"""

import sys

from tinyddpm.checkpoint import PRETRAINED, Checkpoint, load_checkpoint, save_checkpoint


def main(source, target=PRETRAINED):
    run = load_checkpoint(source)
    weights = "ema" if run.ema is not None else "model"
    train = {**run.train, "weights": weights, "exported_from_step": run.train["step"]}
    save_checkpoint(target, Checkpoint(model_config=run.model_config,
                                       model=run.ema if run.ema is not None else run.model, train=train))
    print(f"wrote {target} ({weights} weights of update {run.train['step']})")


if __name__ == "__main__":
    main(*sys.argv[1:])
