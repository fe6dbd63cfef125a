"""Generate images for condition files or label lists with a trained model.

    python sample.py --model runs/small/model --conditions data/test.json data/new_test.json --out samples
    python sample.py --model runs/small/model --labels "red sphere,cyan cylinder,cyan cube" --out samples
    python sample.py --model runs/small/model --process --out samples      # the denoising-process figure

For each condition file (or --labels) OUT/NAME/ gets grid.png (8 per row, as the course asks), images/000.png,
... and conditions.json (labels, model, sampler, steps, guidance scale, seed). Each folder is written under a
temporary name and moved into place, so it is complete or absent.

Guidance: eps = eps_uncond + s * (eps_cond - eps_uncond) with the all-zero label vector as "unconditional";
--guidance-scale 1 is plain conditional sampling (no guidance), larger values follow the labels more strictly.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

import dataset
from dataset import UserError, run_cli
from model import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, load_pipeline, sampling_scheduler

PROCESS_LABELS = "red sphere,cyan cylinder,cyan cube"  # the course's process-figure example
MAX_GUIDANCE = 20.0


def pick_device(name=None):
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here (use --device cpu)")
    return name


def check_sampling_settings(sampler, steps, guidance_scale, guidance_max_t=None):
    """Refuse a sampler, step count or guidance setting out of range (from a flag or a sampling.json)."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if steps is not None and not 1 <= steps <= 1000:
        raise UserError(f"--steps must be between 1 and 1000 (got {steps})")
    if not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise UserError(f"--guidance-scale must be between 0 and {MAX_GUIDANCE:g} (got {guidance_scale:g}; "
                        f"1 means no guidance)")
    if guidance_max_t is not None and not 0 <= guidance_max_t <= 1000:
        raise UserError(f"--guidance-max-t must be between 0 and 1000 (got {guidance_max_t}; 1000 guides every step)")


def sampling_settings(sampler, steps, guidance_scale, guidance_max_t=None):
    """Checked settings as a sampling.json holds them (guidance_max_t only when guidance is limited)."""
    check_sampling_settings(sampler, steps, guidance_scale, guidance_max_t)
    settings = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
    return settings if guidance_max_t is None else {**settings, "guidance_max_t": guidance_max_t}


def describe_guidance(guidance_scale, guidance_max_t=None):
    """'guidance 3' or 'guidance 3 below t=500', for printed summaries."""
    return f"guidance {guidance_scale:g}" + ("" if guidance_max_t is None else f" below t={guidance_max_t}")


def prepare_pipeline(model, sampler=None, steps=None, guidance_scale=None, device="cpu", guidance_max_t=None):
    """The pipeline with its sampler, and the settings to sample with: each explicit value first, then what the
    model folder was measured with (its sampling.json; its steps only with its own sampler), then the defaults
    (DEFAULT_SAMPLER, DEFAULT_STEPS, guidance 1 at every step).
    -> (pipe, {"sampler", "steps", "guidance_scale"[, "guidance_max_t"]})"""
    check_sampling_settings(sampler or DEFAULT_SAMPLER, steps, 1.0 if guidance_scale is None else guidance_scale,
                            guidance_max_t)
    pipe = load_pipeline(model, pick_device(device))
    saved = pipe.sampling_settings
    sampler = sampler or saved.get("sampler", DEFAULT_SAMPLER)
    if steps is None:
        steps = saved["steps"] if saved.get("sampler") == sampler and "steps" in saved else DEFAULT_STEPS[sampler]
    if guidance_scale is None:
        guidance_scale = float(saved.get("guidance_scale", 1.0))
    if guidance_max_t is None:
        guidance_max_t = saved.get("guidance_max_t")
    settings = sampling_settings(sampler, steps, guidance_scale, guidance_max_t)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, sampler)
    return pipe, settings


def generate(pipe, label_lists, seed=0, steps=None, guidance_scale=1.0, batch_size=64, callback=None,
             guidance_max_t=None):
    """uint8 images (N, 64, 64, 3); the same seed and settings give the same images."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    return pipe(label_lists, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                output_type="np", batch_size=batch_size, callback=callback, guidance_max_t=guidance_max_t).images


def grid_image(images_uint8, nrow=8):
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255
    return make_grid(x, nrow=nrow, padding=2)


def write_sample_folder(out, images, record):
    """OUT/ with grid.png, images/NNN.png and conditions.json, published atomically."""
    out = Path(out)
    temp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    (temp / "images").mkdir(parents=True)
    names = [f"images/{i:03d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        Image.fromarray(image).save(temp / name)
    save_image(grid_image(images), temp / "grid.png")
    (temp / "conditions.json").write_text(json.dumps({**record, "images": names}, indent=1))
    dataset.publish_dir(temp, out)
    return out


def generation_options(settings):
    """prepare_pipeline's settings as generate's keyword arguments (all but the sampler, which is the pipe's)."""
    return {key: value for key, value in settings.items() if key != "sampler"}


def write_process_figure(pipe, labels, path, seed, steps, frames=10, **options):
    """One row from (almost) pure noise to the final image: min(frames, steps) evenly spaced samples x_t."""
    keep = set(np.linspace(0, steps - 1, frames).round().astype(int).tolist())
    shots = []

    def collect(i, t, x):
        if i in keep:
            shots.append(pipe.to_image(x[:1])[0].cpu())

    generate(pipe, [labels], seed, steps, callback=collect, **options)
    with dataset.replacing(path) as temp:
        save_image(make_grid((torch.stack(shots) + 1) / 2, nrow=len(shots), padding=2), temp)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/default/model",
                   help="exported model folder (RUN/model), a run folder, or a checkpoint RUN/checkpoints/step-N")
    p.add_argument("--conditions", nargs="+", metavar="FILE",
                   help="condition files in the test.json format (default: DATA_DIR/test.json and "
                        "DATA_DIR/new_test.json when neither --labels nor --process is given)")
    p.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR, help="where the default condition files are")
    p.add_argument("--labels", help='one label set, comma-separated: "red sphere,cyan cube"')
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="ddpm: the full 1000-step ancestral chain (the report's); ddim; dpm++ (DPM-Solver++; at chance "
                        "on epsilon models with linear betas) (default: the model folder's sampling.json, else "
                        f"{DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int,
                   help="denoising steps (default: the model folder's, else " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance scale: 1 = none, 0 = unconditional, >1 = stronger labels "
                        "(default: the model folder's, else 1)")
    p.add_argument("--guidance-max-t", type=int,
                   help="guide only the steps at timesteps below this (of 1000), one pass instead of two at the "
                        "others; 1000 guides every step (default: the model folder's, else every step)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise: same seed, same images")
    p.add_argument("--batch-size", type=int, default=64, help="images denoised at once")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default="samples", help="output folder (created if missing)")
    p.add_argument("--process", action="store_true",
                   help="also write OUT/process.png: the denoising process of one label set")
    p.add_argument("--process-labels", default=PROCESS_LABELS, help="label set of the process figure")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    pipe, sampling = prepare_pipeline(args.model, args.sampler, args.steps, args.guidance_scale, args.device,
                                      args.guidance_max_t)
    options = generation_options(sampling)
    vocabulary = pipe.unet.vocabulary
    jobs = {}
    if args.labels:
        jobs["labels"] = ("--labels", [dataset.parse_label_string(args.labels, vocabulary)])
    files = args.conditions or ([] if args.labels or args.process else dataset.default_condition_files(args.data_dir))
    for path in files:
        jobs[Path(path).stem] = (str(path), dataset.load_conditions(path, vocabulary))
    process_labels = dataset.parse_label_string(args.process_labels, vocabulary) if args.process else None
    out = dataset.make_output_dir(args.out)
    settings = {"model": str(args.model), **sampling, "seed": args.seed}
    for name, (source, label_lists) in jobs.items():
        images = generate(pipe, label_lists, args.seed, batch_size=args.batch_size, **options)
        folder = write_sample_folder(out / name, images, {"source": source, **settings, "labels": label_lists})
        print(f"wrote {folder}/grid.png and {len(images)} images")
    if process_labels:
        path = write_process_figure(pipe, process_labels, out / "process.png", args.seed, **options)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
