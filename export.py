"""Make a small model folder to share from a trained one: half-precision weights (safetensors) and the sampling
settings it was measured with (sampling.json), which sample.py and evaluate.py use when no flag overrides them.

    python export.py runs/tokens/model pretrained/tokens-cpu --sampler ddim --steps 15 --guidance-scale 3

The folder is written under a temporary name and moved into place, so it is complete or absent. Loading gives
float32 weights again (sample.py, evaluate.py, ICLEVRPipeline.from_pretrained(..., dtype=torch.float32)).
"""
import argparse
import os
from pathlib import Path

import torch

from cli import UserError, folder_megabytes, make_output_dir, publish_dir, run_cli
from model import (DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS, SAMPLERS, ICLEVRPipeline, find_model_dir, load_pipeline,
                   read_sampling_settings, write_sampling_settings)
from sampling import describe_guidance, parse_guidance_by_objects, resolve_sampling


def export(source, destination, sampling, half=True, max_shard_mb=None):
    """Copy the model at `source` (a model, run or checkpoint folder) to `destination` with `sampling` settings;
    `max_shard_mb` splits larger weight files (for transfers with a file-size limit)."""
    pipe = load_pipeline(source)
    destination = Path(destination)
    make_output_dir(destination.parent)
    temp = destination.with_name(f".tmp-{destination.name}-{os.getpid()}")
    if half:
        pipe.to(torch.float16)
    shards = {"max_shard_size": f"{max_shard_mb}MB"} if max_shard_mb else {}
    # a new pipeline object: the loaded one's config would record the source path
    ICLEVRPipeline(unet=pipe.unet, scheduler=pipe.scheduler, upsampler=pipe.upsampler).save_pretrained(temp, **shards)
    write_sampling_settings(temp, sampling)
    publish_dir(temp, destination, manifest=True)
    return destination


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="trained model: RUN/model, a run folder or a checkpoint RUN/checkpoints/step-N")
    p.add_argument("destination", help="new model folder, e.g. pretrained/NAME (replaced if it exists)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help=f"sampler the model was measured with (each sampling flag's default: the source folder's "
                        f"sampling.json, else {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int, help="its denoising steps (default: the source's with its sampler, else " +
                   ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--guidance-scale", type=float,
                   help="its classifier-free guidance scale (default: the source's, else 1: none)")
    p.add_argument("--guidance-max-t", type=int, help="its guidance limit: guide only timesteps below this; 1000 = "
                                                      "every step (default: the source's, else every step)")
    p.add_argument("--guidance-by-objects", nargs="+", metavar="K:SCALE[:MAX_T]",
                   help="its guidance for requests of K labels where it differs, e.g. 4:2 (four-label requests at "
                        "scale 2 on every step; default: the source's, else none)")
    p.add_argument("--joint-weight", type=float,
                   help="its share of a composed request's conditional output that reads the request whole (default: "
                        "the source's, else 0: composition alone)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the UNet's arithmetic it was measured with while sampling (bf16: autocast, used where the "
                        "hardware has fast bf16; default: the source's, else fp32)")
    p.add_argument("--fp32", action="store_true", help="keep full-precision weights (twice the size)")
    p.add_argument("--max-shard-mb", type=int, help="split weight files larger than this many MB")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # each flag, then what the source was measured with (a re-export keeps its settings), then the defaults
    sampling = resolve_sampling(read_sampling_settings(find_model_dir(args.source)), args.sampler, args.steps,
                                args.guidance_scale, args.guidance_max_t, args.precision,
                                parse_guidance_by_objects(args.guidance_by_objects), args.joint_weight)
    if Path(args.destination).resolve() == Path(args.source).resolve():
        raise UserError(f"{args.destination}: the destination must differ from the source")
    folder = export(args.source, args.destination, sampling, half=not args.fp32, max_shard_mb=args.max_shard_mb)
    guidance = describe_guidance(sampling["guidance_scale"], sampling.get("guidance_max_t"),
                                 sampling.get("guidance_by_objects"))
    print(f"wrote {folder} ({folder_megabytes(folder):.1f} MB; samples with {sampling['sampler']}, "
          f"{sampling['steps']} steps, {guidance}, {sampling.get('precision', 'fp32')})")
    return 0


if __name__ == "__main__":
    run_cli(main)
