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
from cli import make_output_dir, publish_dir, replacing, run_cli
from model import generate, prepare_pipeline
from sampling import add_sampling_flags, compose_threshold, sampling_flags

PROCESS_LABELS = "red sphere,cyan cylinder,cyan cube"  # the course's process-figure example


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
    publish_dir(temp, out)
    return out


def process_frames(samples, estimates, frames):
    """Indices of min(frames, len(samples)) steps placed evenly along the way the picture travels to the final one,
    not evenly in step index: at high noise many steps change nothing a reader can see, and the scene forms within
    a few. The way is the mean of the noisy sample's and the clean estimate's progress (1 - distance to the final
    image over the first one's); the first and last steps are always shown."""
    progress = []
    for pictures in (samples, estimates):
        flat = torch.stack(pictures).flatten(1)
        distance = (flat - flat[-1]).norm(dim=1)
        progress.append(1 - distance / distance[0].clamp(min=1e-8))
    progress = (progress[0] + progress[1]) / 2
    chosen = []
    for level in torch.linspace(0, 1, min(frames, len(samples))).tolist():
        unused = [i for i in range(len(samples)) if i not in chosen]
        chosen.append(min(unused, key=lambda i: abs(progress[i].item() - level)))
    return sorted(chosen)


@torch.no_grad()
def process_columns(pipe, labels, settings, seed, frames=10, compose_above="auto"):
    """The process figure's columns: (title, noisy sample, clean estimate or None), images HxWx3 in [0, 1] at the
    output size (through the folder's upsampler), for the steps process_frames chooses, then the final image."""
    seen = []
    final = generate(pipe, [labels], settings, seed, callback=lambda i, t, x, x0: seen.append((int(t), x[:1], x0[:1])),
                     compose_above=compose_above)[0]

    def picture(sample):
        return ((pipe.to_image(sample)[0].permute(1, 2, 0).cpu().float().numpy() + 1) / 2).clip(0, 1)

    columns = [(f"t={t}", picture(x), picture(x0)) for t, x, x0 in seen] + [("final", final / 255, None)]
    chosen = process_frames([torch.from_numpy(top).float() for _, top, _ in columns],
                            [torch.from_numpy(top if bottom is None else bottom).float() for _, top, bottom in columns],
                            frames)
    return [columns[i] for i in chosen]


def write_process_figure(pipe, labels, path, settings, seed, frames=10, compose_above="auto"):
    """One PNG: above, the noisy sample the model denoises at the chosen timesteps, from pure noise to the final
    image; beneath each, the model's estimate of the clean image from it; each column titled with its timestep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = process_columns(pipe, labels, settings, seed, frames, compose_above)
    fig, axes = plt.subplots(2, len(columns), figsize=(0.95 * len(columns) + 0.9, 2.55), squeeze=False)
    for column, (title, top, bottom) in enumerate(columns):
        for axis, image in zip((axes[0][column], axes[1][column]), (top, bottom)):
            axis.set_xticks([])
            axis.set_yticks([])
            if image is None:
                axis.axis("off")
            else:
                axis.imshow(image, interpolation="nearest")
        axes[0][column].set_title(title, fontsize=8)
    axes[0][0].set_ylabel("noisy sample", fontsize=8)
    axes[1][0].set_ylabel("clean\nestimate", fontsize=8)
    fig.suptitle(", ".join(labels), fontsize=9)
    fig.tight_layout(pad=0.3, w_pad=0.2, h_pad=0.2)
    with replacing(path) as temp:
        fig.savefig(temp, dpi=100)
    plt.close(fig)
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
    add_sampling_flags(p, profiles=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise: same seed, same images")
    p.add_argument("--batch-size", type=int, default=64, help="images denoised at once")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--out", default="samples", help="output folder (created if missing)")
    p.add_argument("--process", action="store_true",
                   help="also write OUT/process.png: the denoising process of one label set (the noisy sample "
                        "above, the model's estimate of the clean image beneath, at steps placed where the image "
                        "changes, each labelled with its timestep)")
    p.add_argument("--process-labels", default=PROCESS_LABELS, help="label set of the process figure")
    p.add_argument("--process-frames", type=int, default=10,
                   help="columns of the process figure (at most the number of denoising steps)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.process_frames < 2:
        p.error("--process-frames must be at least 2 (pure noise and the final image)")
    return args


def main(argv=None):
    args = parse_args(argv)
    pipe, sampling = prepare_pipeline(args.model, device=args.device, **sampling_flags(args))
    compose_above = compose_threshold(args)
    vocabulary = pipe.unet.vocabulary
    sources, names, requests = [], [], []
    if args.labels:
        sources, names, requests = ["--labels"], ["labels"], [[dataset.parse_label_string(args.labels, vocabulary)]]
    files = args.conditions or ([] if args.labels or args.process else dataset.default_condition_files(args.data_dir))
    for path in files:
        sources.append(str(path))
        names.append(Path(path).stem)
        requests.append(dataset.load_conditions(path, vocabulary))
    jobs = dict(zip(dataset.unique_set_names(sources, names), zip(sources, requests)))
    process_labels = dataset.parse_label_string(args.process_labels, vocabulary) if args.process else None
    for _, label_lists in jobs.values():  # a request the model cannot draw is refused before anything is written
        pipe.label_vectors(label_lists, compose_above)
    out = make_output_dir(args.out)
    settings = {"model": str(args.model), **({"profile": args.profile} if args.profile else {}), **sampling.to_json(),
                "seed": args.seed}
    for name, (source, label_lists) in jobs.items():
        images = generate(pipe, label_lists, sampling, args.seed, args.batch_size, compose_above=compose_above)
        folder = write_sample_folder(out / name, images, {"source": source, **settings, "labels": label_lists})
        print(f"wrote {folder}/grid.png and {len(images)} images")
    if process_labels:
        path = write_process_figure(pipe, process_labels, out / "process.png", sampling, args.seed,
                                    args.process_frames, compose_above)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
