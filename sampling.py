"""Sampling settings and drawing images: what sample.py, evaluate.py, export.py and train.py's evaluation share.

A model folder's sampling.json holds the settings it was measured with (sampler, steps, guidance scale and range,
guidance per object count, joint weight for composed requests, precision); resolve_sampling merges them with
flags (each flag first, then the folder's, then the defaults); prepare_pipeline loads a folder with them, and
generate draws images.
"""
import torch

from cli import UserError, warn
from model import (DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_COMPOSED, PRECISIONS, SAMPLERS, fast_bf16, load_pipeline,
                   sampling_scheduler)

MAX_GUIDANCE = 20.0
# what each sampling flag's default is when it is not given
FOLDER_DEFAULT = "the model folder's sampling.json"


def pick_device(name=None):
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here (use --device cpu)")
    return name


def check_sampling_settings(sampler, steps, guidance_scale, guidance_max_t=None, precision="fp32",
                            guidance_by_objects=None, joint_weight=0.0):
    """Refuse a sampler, step count, guidance setting or precision out of range (from a flag or a sampling.json)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if steps is not None and not 1 <= steps <= 1000:
        raise UserError(f"--steps must be between 1 and 1000 (got {steps})")
    if not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise UserError(f"--guidance-scale must be between 0 and {MAX_GUIDANCE:g} (got {guidance_scale:g}; "
                        f"1 means no guidance)")
    if guidance_max_t is not None and not 0 <= guidance_max_t <= 1000:
        raise UserError(f"--guidance-max-t must be between 0 and 1000 (got {guidance_max_t}; 1000 guides every step)")
    if not 0 <= joint_weight <= 1:
        raise UserError(f"--joint-weight must be between 0 and 1 (got {joint_weight:g}; 0: composition alone)")
    for count, entry in (guidance_by_objects or {}).items():
        scale, max_t = entry["guidance_scale"], entry.get("guidance_max_t")
        in_range = max_t is None or 0 <= max_t <= 1000
        if not (1 <= int(count) <= MAX_COMPOSED and 0 <= scale <= MAX_GUIDANCE and in_range):
            raise UserError(f"--guidance-by-objects {count}:{scale:g}{'' if max_t is None else f':{max_t}'}: K must be "
                            f"between 1 and {MAX_COMPOSED}, SCALE between 0 and {MAX_GUIDANCE:g}, MAX_T between 0 and "
                            f"1000")


def parse_guidance_by_objects(texts):
    """--guidance-by-objects K:SCALE[:MAX_T] ... as sampling.json holds it, {"K": {"guidance_scale": SCALE[,
    "guidance_max_t": MAX_T]}}; None without the flag."""
    if not texts:
        return None
    settings = {}
    for text in texts:
        try:
            count, scale, *max_t = text.split(":")
            if len(max_t) > 1:
                raise ValueError(text)
            settings[str(int(count))] = {"guidance_scale": float(scale),
                                         **({"guidance_max_t": int(max_t[0])} if max_t else {})}
        except ValueError:
            raise UserError(f"--guidance-by-objects {text}: expected K:SCALE or K:SCALE:MAX_T, e.g. 4:2 (requests of "
                            f"4 labels at guidance 2 on every step)")
    return settings


def sampling_settings(sampler, steps, guidance_scale, guidance_max_t=None, precision="fp32",
                      guidance_by_objects=None, joint_weight=0.0):
    """Checked settings as a sampling.json holds them (guidance_max_t only when guidance is limited,
    guidance_by_objects only when there is one, joint_weight only when not 0, precision only when not fp32)."""
    check_sampling_settings(sampler, steps, guidance_scale, guidance_max_t, precision, guidance_by_objects,
                            joint_weight)
    settings = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
    if guidance_max_t is not None:
        settings["guidance_max_t"] = guidance_max_t
    if guidance_by_objects:
        settings["guidance_by_objects"] = {k: guidance_by_objects[k] for k in sorted(guidance_by_objects, key=int)}
    if joint_weight:
        settings["joint_weight"] = joint_weight
    return settings if precision == "fp32" else {**settings, "precision": precision}


def describe_guidance(guidance_scale, guidance_max_t=None, guidance_by_objects=None):
    """'guidance 3', 'guidance 3 below t=500' or 'guidance 3 below t=500; 4 objects: guidance 2', for printed
    summaries."""
    text = f"guidance {guidance_scale:g}" + ("" if guidance_max_t is None else f" below t={guidance_max_t}")
    for count, entry in (guidance_by_objects or {}).items():
        text += f"; {count} objects: " + describe_guidance(entry["guidance_scale"], entry.get("guidance_max_t"))
    return text


def resolve_sampling(saved, sampler=None, steps=None, guidance_scale=None, guidance_max_t=None, precision=None,
                     guidance_by_objects=None, joint_weight=None):
    """The settings to sample with: each explicit value first, then what the model folder was measured with
    (`saved`, its sampling.json; its steps only with its own sampler), then the defaults (DEFAULT_SAMPLER,
    DEFAULT_STEPS, guidance 1 at every step and for every object count, composition alone, fp32). Checked, in the
    form sampling_settings gives."""
    sampler = sampler or saved.get("sampler", DEFAULT_SAMPLER)
    if steps is None:
        steps = saved["steps"] if saved.get("sampler") == sampler and "steps" in saved else DEFAULT_STEPS[sampler]
    if guidance_scale is None:
        guidance_scale = float(saved.get("guidance_scale", 1.0))
    if guidance_max_t is None:
        guidance_max_t = saved.get("guidance_max_t")
    if guidance_by_objects is None:
        guidance_by_objects = saved.get("guidance_by_objects")
    if joint_weight is None:
        joint_weight = float(saved.get("joint_weight", 0.0))
    precision = precision or saved.get("precision", "fp32")
    return sampling_settings(sampler, steps, guidance_scale, guidance_max_t, precision, guidance_by_objects,
                             joint_weight)


def prepare_pipeline(model, sampler=None, steps=None, guidance_scale=None, device="cpu", guidance_max_t=None,
                     precision=None, guidance_by_objects=None, joint_weight=None):
    """The pipeline with its sampler, and the settings to sample with (resolve_sampling: each flag, then the model
    folder's sampling.json, then the defaults). bf16 where the hardware has no fast bf16 (a CPU without AMX-BF16 or
    AVX512-BF16) is fp32, with a note.
    -> (pipe, {"sampler", "steps", "guidance_scale"[, "guidance_max_t"][, "guidance_by_objects"][, "joint_weight"]
               [, "precision"]})"""
    check_sampling_settings(sampler or DEFAULT_SAMPLER, steps, 1.0 if guidance_scale is None else guidance_scale,
                            guidance_max_t, precision or "fp32", guidance_by_objects, joint_weight or 0.0)
    pipe = load_pipeline(model, pick_device(device))
    settings = resolve_sampling(pipe.sampling_settings, sampler, steps, guidance_scale, guidance_max_t, precision,
                                guidance_by_objects, joint_weight)
    if settings.get("precision") == "bf16" and not fast_bf16(pipe.device.type):
        warn(f"this {pipe.device.type.upper()} has no fast bf16 (AMX-BF16 or AVX512-BF16 on a CPU): sampling in fp32")
        settings.pop("precision")
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, settings["sampler"])
    return pipe, settings


def add_sampling_flags(parser, default_from=FOLDER_DEFAULT, compose=True):
    """The sampling flags sample.py, evaluate.py and export.py share, with one help text each: sampler, steps,
    guidance scale and range, guidance per object count, joint weight, precision and (with `compose`) the
    composition threshold. Unset, each is None: `default_from` (a model folder's sampling.json), then the defaults
    (resolve_sampling)."""
    steps = ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="ddpm: the full 1000-step ancestral chain (the report's); ddim; dpm++ (DPM-Solver++; at "
                             f"chance on epsilon models with linear betas) (default: {default_from}, else "
                             f"{DEFAULT_SAMPLER})")
    parser.add_argument("--steps", type=int,
                        help=f"denoising steps (default: {default_from}, with its own sampler only; else {steps})")
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance scale: 1 = none, 0 = unconditional, >1 = stronger labels "
                             f"(default: {default_from}, else 1)")
    parser.add_argument("--guidance-max-t", type=int,
                        help="guide only the steps at timesteps below this (of 1000), one pass instead of two at the "
                             f"others; 1000 guides every step (default: {default_from}, else every step)")
    parser.add_argument("--guidance-by-objects", nargs="+", metavar="K:SCALE[:MAX_T]",
                        help="a guidance of its own for requests of K labels, e.g. 4:2 (four-label requests at scale "
                             "2 on every step) or 3:4:500 (scale 4 below t=500); other requests keep "
                             f"--guidance-scale and --guidance-max-t (default: {default_from}, else none)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="the UNet's arithmetic while sampling: bf16 (autocast) is faster where the hardware has "
                             "it (AMX-BF16 or AVX512-BF16 on a CPU, most GPUs), fp32 elsewhere; an evaluator always "
                             f"scores in fp32 (default: {default_from}, else fp32)")
    parser.add_argument("--joint-weight", type=float, metavar="W",
                        help="for a composed request, the share of its conditional output that reads the request "
                             "whole (as far as the model reads: 4 object tokens), the rest shared by its "
                             f"sub-requests; 0: composition alone (default: {default_from}, else 0)")
    if compose:
        parser.add_argument("--compose-above", type=int, metavar="N",
                            help="draw requests of more than N labels by composing their N-label sub-requests, one "
                                 "batched pass per step (default: the largest scene the model was trained on, 4 for "
                                 "the shipped model, so that 5 and 6 objects can be asked for; 0: never, joint "
                                 "sampling of every request)")


def sampling_flags(args):
    """The values of add_sampling_flags' flags, as resolve_sampling and prepare_pipeline take them."""
    return {"sampler": args.sampler, "steps": args.steps, "guidance_scale": args.guidance_scale,
            "guidance_max_t": args.guidance_max_t, "precision": args.precision,
            "guidance_by_objects": parse_guidance_by_objects(args.guidance_by_objects),
            "joint_weight": args.joint_weight}


def generate(pipe, label_lists, seed=0, steps=None, guidance_scale=1.0, batch_size=64, callback=None,
             guidance_max_t=None, precision="fp32", compose_above="auto", guidance_by_objects=None,
             joint_weight=0.0):
    """uint8 images (N, 64, 64, 3); the same seed and settings give the same images. Requests with more labels
    than `compose_above` ("auto": the model's largest training scene) are composed of sub-requests, with the
    request read whole at `joint_weight`; requests of K labels take the guidance guidance_by_objects[K] =
    (scale, max_t) where it has one."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    return pipe(label_lists, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                output_type="np", batch_size=batch_size, callback=callback, guidance_max_t=guidance_max_t,
                precision=precision, compose_above=compose_above, guidance_by_objects=guidance_by_objects,
                joint_weight=joint_weight).images


def generation_options(settings, compose_above=None):
    """prepare_pipeline's settings as generate's keyword arguments (all but the sampler, which is the pipe's;
    guidance_by_objects as {K: (scale, max_t)}), with --compose-above where given (0: never compose)."""
    options = {key: value for key, value in settings.items() if key != "sampler"}
    if "guidance_by_objects" in options:
        options["guidance_by_objects"] = {int(count): (entry["guidance_scale"], entry.get("guidance_max_t"))
                                          for count, entry in options["guidance_by_objects"].items()}
    return options if compose_above is None else {**options, "compose_above": compose_above or None}
