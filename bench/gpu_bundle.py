"""Everything a run on a lent GPU machine needs that the checkout does not hold, in one folder to carry along:

    python bench/gpu_bundle.py --data-dir ../shared/data --preset tokens        # writes gpu-bundle/ (git ignores it)

then, with the device tool: run `bash bench/gpu_run.sh` with carry ["gpu-bundle"] (docs/RESULTS.md, "A lent GPU").

gpu-bundle/data/ is a data folder in the course layout that train.py reads like any other (--data-dir
gpu-bundle/data): train.json, objects.json and, instead of 18,009 PNGs (142 MB, which cannot travel), iclevr.npz:
the training images at the preset's denoising size. For the 32-pixel presets they are 2x2 averages rounded to uint8
(what train.py computes from the PNGs at every step, to 1/255), stored exactly (16.7 MB). Exact 64x64 images take
62.5 MiB, which leaves no room for the checkout, so 64-pixel presets (`seed`) get JPEG at quality 95 with
full-resolution colour (18.3 MiB): the project evaluator scores its held-out images 0.9816 so, 0.9819 as PNGs,
within what noise of 1/255 does to it (docs/RESULTS.md, "A lent GPU").

gpu-bundle/conditions/ holds the label sets a run scores when its model is too big to come back whole (`seed`):
test.json and new_test.json where the data folder has them, and random-96-5.json, the held-out draw
`evaluate.py --conditions random:96:5` makes. gpu-bundle/wheels/ holds the Python packages the GPU machine lacks
(diffusers and importlib_metadata, built for its Python 3.12), fetched from PyPI by pip.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dataset  # noqa: E402
import synthetic  # noqa: E402
from cli import UserError, folder_megabytes, make_output_dir, publish_dir, run_cli  # noqa: E402
from model import PRESETS, build_model, to_sample_size  # noqa: E402
from scoring import parse_condition_arg  # noqa: E402

TRAVEL_MIB = 64  # what may travel to the machine: the checkout and the bundle together
WHEELS = ["diffusers==0.42.1", "importlib_metadata==10.2.0"]  # the GPU image has the rest (device/KINDS.md)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
HELD_OUT = "random:96:5"  # the held-out draw the shipping decisions use (docs/RESULTS.md)


def packed_images(data, size):
    """uint8 (N, size, size, 3): the images at the denoising size, averaged as train.py averages them."""
    parts = []
    for start in range(0, len(data.images), 1024):
        x = to_sample_size(dataset.to_model_input(torch.from_numpy(data.images[start:start + 1024])), size)
        parts.append(dataset.to_uint8(x))
    return np.concatenate(parts)


def checkout_mib(skip):
    """MiB of the checkout that travels with the bundle: what git does not ignore (every file, where this is not a
    git checkout, e.g. the rehearsal's copy), leaving out the folders in skip."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode == 0:
        files = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    else:
        files = [f for f in ROOT.rglob("*") if f.relative_to(ROOT).parts[0] != ".git"]
    skip = [folder.resolve() for folder in skip]
    kept = [f for f in files if f.is_file() and not any(f.resolve().is_relative_to(folder) for folder in skip)]
    return sum(f.stat().st_size for f in kept) / 2**20


def download_wheels(folder):
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS],
               "-d", str(folder), *WHEELS]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"pip could not download {', '.join(WHEELS)}: {result.stderr.strip().splitlines()[-1:]}")


def write_condition_files(folder, data):
    """What a run scores on the GPU machine when its model cannot come back: the course's test files where the data
    folder has them, and the held-out draw, named as evaluate.py names it."""
    folder.mkdir()
    for path in dataset.default_condition_files(data.data_dir):
        if Path(path).is_file():
            shutil.copy(path, folder / Path(path).name)
    name, label_lists = parse_condition_arg(HELD_OUT, data.vocabulary, data)
    (folder / f"{name}.json").write_text(json.dumps(label_lists))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR,
                   help=f"course data folder, or '{dataset.SYNTHETIC}' for generated scenes (a rehearsal)")
    p.add_argument("--preset", default="tokens", choices=list(PRESETS),
                   help="the preset the GPU run trains: the images are packed at its denoising size")
    p.add_argument("--out", default="gpu-bundle", help="the bundle folder (replaced if it exists)")
    p.add_argument("--cache-dir", default=str(dataset.DEFAULT_CACHE_DIR), help="where decoded images are cached")
    p.add_argument("--jpeg-quality", type=int,
                   help="store the images as JPEG of this quality (1-100, full-resolution colour); 0: exactly "
                        "(default: exactly for 32-pixel presets, 95 for 64-pixel ones, whose exact images do not fit)")
    p.add_argument("--no-wheels", action="store_true",
                   help="leave out the wheels (a CPU rehearsal where diffusers is installed already)")
    args = p.parse_args(argv)
    if args.jpeg_quality is not None and not 0 <= args.jpeg_quality <= 100:
        p.error("--jpeg-quality must be 0 (exact) or 1-100")

    data = dataset.load_training_set(synthetic.resolve_data_dir(args.data_dir, args.cache_dir),
                                     cache_dir=args.cache_dir)
    size = build_model(args.preset, data.vocabulary.names).denoising_size
    quality = args.jpeg_quality if args.jpeg_quality is not None else (95 if size > 32 else 0)
    out = Path(args.out)
    make_output_dir(out.parent)
    temp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        (temp / "data").mkdir(parents=True)
        (temp / "data" / "objects.json").write_text(json.dumps(data.vocabulary.index_of))
        (temp / "data" / "train.json").write_text(json.dumps(dict(zip(data.filenames, data.label_lists))))
        dataset.write_pack(temp / "data" / dataset.PACK, data.filenames, packed_images(data, size),
                           jpeg_quality=quality or None)
        write_condition_files(temp / "conditions", data)
        if not args.no_wheels:
            download_wheels(temp / "wheels")
        total = folder_megabytes(temp) * 1e6 / 2**20  # MiB, as the device tool counts
        checkout = checkout_mib(skip=[temp, out])
        room = TRAVEL_MIB - checkout
        if total > room:
            images = (temp / "data" / dataset.PACK).stat().st_size / 2**20
            raise UserError(f"the bundle would be {total:.1f} MiB, over the {room:.1f} MiB left beside the checkout "
                            f"({TRAVEL_MIB} MiB travel in all; the checkout itself is {checkout:.1f} MiB, the images "
                            f"{images:.1f} MiB: a lower --jpeg-quality makes them smaller)")
        publish_dir(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    wheels = "" if args.no_wheels else ", wheels for Python 3.12"
    stored = f"JPEG quality {quality}" if quality else "exactly"
    print(f"wrote {out} ({total:.1f} MiB: {len(data)} images at {size}x{size}, {stored}{wheels}; "
          f"{room - total:.1f} MiB to spare beside the checkout)")
    return 0


if __name__ == "__main__":
    run_cli(main)
