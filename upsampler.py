"""Give a model folder a learned upsampler: a small CNN (model.Upsampler) that takes the real training images,
averaged down to the size the UNet denoises at (with a little added grain, as the UNet's samples have), back to
their full size. The pipeline then uses it in place of bicubic upsampling. Bicubic's slight blur (1.5/255 per
pixel) costs the project's evaluator a sixth of its accuracy on real images (docs/RESULTS.md); the learned one
wins most of it back, in a few minutes on a CPU.

    python upsampler.py pretrained/iclevr-tokens --data-dir ../shared/data          # replaces the folder
    python upsampler.py runs/tokens/model --out runs/tokens/model-sharp --minutes 2

The UNet's files are copied as they are; the folder is written under a temporary name and moved into place, so
it is complete or absent. Whole scenes are held out to report the reconstruction error against bicubic.
"""
import argparse
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import dataset
import synthetic
from cli import UserError, make_output_dir, publish_dir, run_cli
from model import ICLEVRPipeline, Upsampler, find_model_dir, load_pipeline, to_image_size, to_sample_size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (RUN/model, a run folder, a checkpoint or an exported folder) whose "
                                 "UNet denoises below its output size (e.g. the tokens preset: 32 for 64)")
    p.add_argument("--out", help="where to write the folder with its upsampler (default: replace MODEL's folder)")
    p.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR,
                   help=f"images to learn from, in the course layout (the data the model was trained on), or "
                        f"'{dataset.SYNTHETIC}' for generated scenes")
    p.add_argument("--cache-dir", default=str(dataset.DEFAULT_CACHE_DIR),
                   help="where decoded images are cached between runs")
    p.add_argument("--minutes", type=float, default=5,
                   help="training time (5 minutes on the course data: held-out PSNR 38.4 -> 42.1 dB, docs/RESULTS.md)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps, if sooner than --minutes")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (constant)")
    p.add_argument("--width", type=int, default=48, help="channels of the upsampler's convolutions")
    p.add_argument("--depth", type=int, default=4, help="hidden 3x3 convolutions between its first and last")
    p.add_argument("--input-noise", type=float, default=0.04,
                   help="the most Gaussian noise (std, images in [-1, 1]) added to its input, drawn per image from "
                        "[0, this]: a UNet's samples keep a little grain, which the upsampler so learns to remove "
                        "(0: clean inputs only)")
    p.add_argument("--held-out-images", type=int, default=500,
                   help="images of whole held-out scenes for the reported error (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the batch order")
    p.add_argument("--from", dest="source_upsampler", metavar="FOLDER",
                   help="instead of training one, add the learned upsampler of this model folder (it depends on the "
                        "images, not on the UNet: one trained on the same data serves any model of the same "
                        "denoising size); the held-out PSNR is reported as after training")
    return p.parse_args(argv)


def check_model(pipe, data):
    size, image_size = pipe.unet.denoising_size, pipe.unet.config.image_size
    if size == image_size:
        raise UserError(f"this model denoises at its output size ({size} pixels): there is nothing to upsample")
    if image_size % size:
        raise UserError(f"the model denoises at {size} pixels for {image_size}-pixel images: not a whole factor")
    if data.images.shape[1] != image_size:
        raise UserError(f"the data's images are {data.images.shape[1]} pixels, the model's {image_size}")
    return image_size // size


def training_pair(images_uint8, size, flip=None):
    """(the image averaged down to the denoising size, the image): what the upsampler maps from and to."""
    full = dataset.to_model_input(images_uint8, flip)
    return to_sample_size(full, size), full


def add_grain(small, most, generator):
    """Gaussian noise of a random strength in [0, most] per image."""
    strength = torch.rand(len(small), 1, 1, 1, generator=generator) * most
    return small + strength * torch.randn(small.shape, generator=generator)


def train_upsampler(upsampler, data, size, args):
    """Learn the correction to bicubic by L1 on the full-size images, for --minutes or --max-steps."""
    optimizer = torch.optim.AdamW(upsampler.parameters(), lr=args.lr)
    steps = args.max_steps or math.inf
    images = torch.from_numpy(data.images)
    generator = torch.Generator().manual_seed(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    bar = tqdm(desc="training the upsampler", unit="step", total=args.max_steps)  # else it stops on the clock
    step = 0
    while step < steps and time.monotonic() < deadline:
        index = dataset.batch_indices(len(images), args.batch_size, args.seed, step)
        small, full = training_pair(images[index], size, torch.rand(len(index), generator=generator) < 0.5)
        if args.input_noise:
            small = add_grain(small, args.input_noise, generator)
        loss = F.l1_loss(upsampler(small), full)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(l1=f"{loss.item() * 127.5:.2f}/255")
    bar.close()
    return step


@torch.no_grad()
def psnr(images, size, upsample, batch_size=256):
    """Peak signal-to-noise ratio (dB, peak-to-peak 2) of `upsample` on `images` averaged down to `size`."""
    errors = []
    for start in range(0, len(images), batch_size):
        small, full = training_pair(torch.from_numpy(images[start:start + batch_size]), size)
        errors.append(((upsample(small) - full) ** 2).flatten(1).mean(1))
    return 10 * math.log10(4 / torch.cat(errors).mean().item())


def write_folder(source, destination, pipe, upsampler):
    """source's files (the UNet's untouched) plus the upsampler, published at destination in one rename."""
    temp = destination.with_name(f".tmp-{destination.name}-{os.getpid()}")
    try:
        shutil.copytree(source, temp, ignore=shutil.ignore_patterns("upsampler"))
        upsampler.save_pretrained(temp / "upsampler")
        ICLEVRPipeline(unet=pipe.unet, scheduler=pipe.scheduler, upsampler=upsampler).save_config(temp)
        publish_dir(temp, destination, manifest=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    for name in ("batch_size", "width", "depth"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.minutes <= 0 or (args.max_steps is not None and args.max_steps < 1):
        raise UserError("--minutes and --max-steps must be positive")
    if args.input_noise < 0:
        raise UserError("--input-noise must be 0 or more")
    source = find_model_dir(args.model)
    destination = Path(args.out) if args.out else source
    pipe = load_pipeline(source)
    data = dataset.load_training_set(synthetic.resolve_data_dir(args.data_dir, args.cache_dir),
                                     cache_dir=args.cache_dir)
    scale = check_model(pipe, data)
    size = pipe.unet.denoising_size
    kept, held = dataset.split_off_scenes(data.filenames, min(args.held_out_images, len(data) // 10), args.seed)
    make_output_dir(destination.parent)

    if args.source_upsampler:
        upsampler = load_pipeline(args.source_upsampler).upsampler
        if upsampler is None or upsampler.config.scale != scale:
            raise UserError(f"{args.source_upsampler}: no learned {scale}x upsampler to take (train one: "
                            f"python upsampler.py MODEL --data-dir DATA)")
        how = f"taken from {args.source_upsampler}"
    else:
        torch.manual_seed(args.seed)
        upsampler = Upsampler(scale=scale, width=args.width, depth=args.depth)
        how = f"{train_upsampler(upsampler, data.subset(kept), size, args)} steps on {len(kept)} images"
    upsampler.eval()
    write_folder(source, destination, pipe, upsampler)
    print(f"wrote {destination} with a learned {scale}x upsampler ({how})")
    if len(held):
        images = data.images[held]
        print(f"held-out PSNR ({len(held)} images of unseen scenes): bicubic "
              f"{psnr(images, size, lambda x: to_image_size(x, size * scale)):.2f} dB, learned "
              f"{psnr(images, size, upsampler):.2f} dB")
    return 0


if __name__ == "__main__":
    run_cli(main)
