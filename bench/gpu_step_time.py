"""Where a training step of the shipped preset spends its time on a GPU, by batch: train.py's whole step (batch,
loss, backward, clipping, AdamW, EMA) against the UNet's forward and backward alone, on random images.

    python bench/gpu_step_time.py                      # on a lent GPU machine (after gpu_run.sh's wheel install)
    python bench/gpu_step_time.py --batches 256 1024 --preset tokens-wide

A step time that barely grows with the batch is fixed overhead (kernel launches, Python): a larger batch or a
captured graph pays there, more arithmetic does not.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import training  # noqa: E402
from model import PRESETS, build_model, training_scheduler  # noqa: E402


def timed(step, repeats, device):
    """Seconds per call of step(i), after 5 untimed calls."""
    for i in range(5):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(repeats):
        step(5 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tokens-wide", choices=list(PRESETS), help="the UNet to time")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="batch sizes to time")
    p.add_argument("--repeats", type=int, default=30, help="timed steps per measurement")
    args = p.parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    names = [f"label {i}" for i in range(24)]
    scheduler = training_scheduler("linear", 1000, "v_prediction")
    model = build_model(args.preset, names, trained_objects=4)
    size = model.denoising_size
    images = torch.randint(0, 256, (max(args.batches) * 4, size, size, 3), dtype=torch.uint8, device=device)
    labels = (torch.rand(len(images), 24, device=device) < 0.1).float()
    for batch in args.batches:
        model = build_model(args.preset, names, trained_objects=4)
        optimizer = training.make_optimizer(model, 3e-4, 0.0)
        lr_scheduler = training.make_lr_scheduler(optimizer, "constant", 10, 1000)
        ema = EMAModel(model.parameters(), decay=0.9995, use_ema_warmup=True, power=2 / 3, foreach=True)
        ema.to(device)
        model, optimizer = accelerator.prepare(model, optimizer)

        def loss_of(step):
            generator = training.step_generator(0, step, 0, device)
            x0, y = training.training_batch(images, labels, batch, 0, step, accelerator, generator, size)
            return training.training_loss(model, scheduler, x0, y, generator, 0.1)

        def whole_step(step):
            loss = loss_of(step)
            training.optimisation_step(accelerator, model, optimizer, lr_scheduler, ema, loss, 1.0)
            loss.item()

        def unet_only(step):
            loss = loss_of(step)
            accelerator.backward(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.item()

        for name, step in (("train.py's step", whole_step), ("forward + backward", unet_only)):
            seconds = timed(step, args.repeats, device)
            print(f"{args.preset} batch {batch}: {name}: {seconds * 1000:.1f} ms/step, {batch / seconds:.0f} images/s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
