"""Make a small model folder to share from a trained one: half-precision weights (safetensors) and the sampling
settings it was measured with (sampling.json), which sample.py and evaluate.py use when no flag overrides them.

    python export.py runs/tokens/model pretrained/tokens-cpu --sampler ddim --steps 15 --guidance-scale 3

    python export.py pretrained/iclevr-tokens pretrained/with-fast --as-profile fast --profile-unet runs/student/model

The second form adds a named profile (sample.py --profile fast) that samples with a distilled student's UNet
(distill.py), kept in the folder as its difference from the folder's own (NAME.unet.safetensors: 3.3 MB for a
student that learned only its conditioning, where the UNet is 33 MB), with the student's sampling settings.
The folder is written under a temporary name and moved into place, so it is complete or absent. Loading gives
float32 weights again (sample.py, evaluate.py, model.load_pipeline). The folder also carries the project's model code,
so diffusers alone loads it: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).
"""
import argparse
import os
import re
import shutil
from pathlib import Path

import torch

from cli import UserError, folder_megabytes, make_output_dir, publish_dir, run_cli
from model import (PROFILE_UNET, ICLEVRPipeline, add_folder_code, find_model_dir, load_pipeline, save_unet_difference,
                   unet_difference)
from sampling import SamplingSettings, add_sampling_flags, read_sampling_json, sampling_flags


CARD_HEADER = """---
library_name: diffusers
license: unknown
tags:
- diffusers
- ddpm
- class-conditional
- i-clevr
- compositional-generation
- ICLEVRPipeline
datasets:
- i-CLEVR
---

"""  # the model card's metadata, which the Hub and other tools index


def model_card(source):
    """The source folder's model card (README.md) with the metadata header, or a short one saying how to load it."""
    card = Path(source) / "README.md"
    if card.is_file():
        text = card.read_text()
        return text if text.startswith("---\n") else CARD_HEADER + text
    return CARD_HEADER + (
        "# An i-CLEVR diffusion model (ICLEVRPipeline)\n\nExported by iclevr-ddpm's export.py. With diffusers alone:\n"
        "\n```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
        'pipe = DiffusionPipeline.from_pretrained("path/to/folder", trust_remote_code=True)\n'
        'settings = pipe.use_sampling_json("path/to/folder")   # its sampling.json\n'
        'images = pipe([["red sphere", "cyan cube"]], settings, generator=torch.Generator().manual_seed(0)).images\n'
        "```\n")


def export(source, destination, sampling, half=True, max_shard_mb=None, profiles=None, profile_unet=None,
           profile_rank=None):
    """Copy the model at `source` (a model, run or checkpoint folder) to `destination` with `sampling` (a
    SamplingSettings) and named `profiles` ({name: SamplingSettings}) beside it, each with the UNet file the source
    has for it, if any; `profile_unet` ((name, UNet)) gives one profile a UNet of its own, a student of the
    source's, stored as its change (low-rank factors with `profile_rank`: model.unet_difference); `max_shard_mb`
    splits larger weight files (for transfers with a file-size limit)."""
    pipe, source_dir = load_pipeline(source), find_model_dir(source)
    try:  # before anything is written
        difference = None if profile_unet is None else unet_difference(profile_unet[1], pipe.unet, profile_rank)
    except UserError as error:
        raise UserError(f"--profile-unet: {error}")
    destination = Path(destination)
    make_output_dir(destination.parent)
    temp = destination.with_name(f".tmp-{destination.name}-{os.getpid()}")
    if half:
        pipe.to(torch.float16)
    shards = {"max_shard_size": f"{max_shard_mb}MB"} if max_shard_mb else {}
    # a new pipeline object: the loaded one's config would record the source path
    ICLEVRPipeline(unet=pipe.unet, scheduler=pipe.scheduler, upsampler=pipe.upsampler).save_pretrained(temp, **shards)
    sampling.write(temp, profiles)
    for name in profiles or {}:
        own = source_dir / PROFILE_UNET.format(name)
        if own.is_file() and (profile_unet is None or profile_unet[0] != name):
            shutil.copyfile(own, temp / own.name)
    if difference is not None:
        save_unet_difference(difference, temp / PROFILE_UNET.format(profile_unet[0]))
    add_folder_code(temp)  # loads with diffusers alone too
    (temp / "README.md").write_text(model_card(source_dir))
    publish_dir(temp, destination, manifest=True)
    return destination


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="trained model: RUN/model, a run folder or a checkpoint RUN/checkpoints/step-N")
    p.add_argument("destination", help="new model folder, e.g. pretrained/NAME (replaced if it exists)")
    add_sampling_flags(p, default_from="the source folder's sampling.json", compose=False)
    p.add_argument("--as-profile", metavar="NAME",
                   help="write the sampling flags as the named profile NAME (sample.py --profile NAME; e.g. fast), "
                        "based on the source's NAME profile where it has one, else on its default settings, which "
                        "stay the folder's default (default: the flags change the default settings)")
    p.add_argument("--profile-unet", metavar="STUDENT",
                   help="with --as-profile: the profile samples with this distilled student's UNet (distill.py; a "
                        "student of the source), stored as its difference from the source's, and starts from the "
                        "student's sampling settings (default: the profile uses the folder's UNet)")
    p.add_argument("--profile-rank", type=int, metavar="R",
                   help="with --profile-unet: store each changed weight's change as its best rank-R factors "
                        "(truncated SVD) where they are smaller, so a full student's 33 MB shrink to a few; "
                        "docs/RESULTS.md measures what a rank costs in accuracy (default: the change in full)")
    p.add_argument("--fp32", action="store_true", help="keep full-precision weights (twice the size)")
    p.add_argument("--max-shard-mb", type=int, help="split weight files larger than this many MB")
    args = p.parse_args(argv)
    if args.as_profile is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", args.as_profile):
        p.error(f"--as-profile {args.as_profile!r}: a name of letters, digits, '-' and '_'")
    if args.profile_unet is not None and args.as_profile is None:
        p.error("--profile-unet needs --as-profile NAME: the profile that samples with it")
    if args.profile_rank is not None and args.profile_unet is None:
        p.error("--profile-rank needs --profile-unet STUDENT: the UNet whose change it stores")
    if args.profile_rank is not None and args.profile_rank < 1:
        p.error("--profile-rank must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    # each flag, then what the source was measured with (a re-export keeps its settings and profiles), then the
    # defaults
    saved = read_sampling_json(find_model_dir(args.source))
    profiles = {name: SamplingSettings.resolve(saved, profile=name) for name in saved.get("profiles", {})}
    profile_unet = None
    if args.as_profile is None:
        sampling = SamplingSettings.resolve(saved, **sampling_flags(args))
    else:
        sampling = SamplingSettings.resolve(saved)
        base = saved.get("profiles", {}).get(args.as_profile, saved)
        if args.profile_unet is not None:
            student = load_pipeline(args.profile_unet)
            base, profile_unet = student.sampling_settings, (args.as_profile, student.unet)
        profiles[args.as_profile] = SamplingSettings.resolve(base, **sampling_flags(args))
    if Path(args.destination).resolve() == Path(args.source).resolve():
        raise UserError(f"{args.destination}: the destination must differ from the source")
    folder = export(args.source, args.destination, sampling, half=not args.fp32, max_shard_mb=args.max_shard_mb,
                    profiles=profiles, profile_unet=profile_unet, profile_rank=args.profile_rank)
    print(f"wrote {folder} ({folder_megabytes(folder):.1f} MB; samples with {sampling.describe()}" +
          "".join(f"; profile {name}: {profile.describe()}" for name, profile in sorted(profiles.items())) + ")")
    return 0


if __name__ == "__main__":
    run_cli(main)
