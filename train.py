"""Train the class-conditioned DDPM on i-CLEVR.

    python train.py --preset small --data-dir data --out runs/small          # CPU
    accelerate launch train.py --preset seed --data-dir data --out runs/seed  # one or more GPUs

The run folder holds checkpoints/ (the last --keep, each written atomically), metrics.jsonl, curves.png and,
at the end, model/ (the EMA weights as an ICLEVRPipeline folder for sample.py and evaluate.py).
"""
import argparse
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dataset
from dataset import UserError, run_cli
from model import (DEFAULT_SAMPLER, PRESETS, SAMPLERS, ICLEVRPipeline, build_model, count_parameters,
                   load_pipeline, sampling_scheduler, to_sample_size, training_scheduler, write_sampling_settings)

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class NonFiniteLoss(UserError):
    exit_code = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR,
                      help=f"course data folder (iclevr/, train.json, objects.json), or '{dataset.SYNTHETIC}' "
                           "for generated scenes (default: $ICLEVR_DATA_DIR or ./data)")
    data.add_argument("--image-dir", help="image folder, if not DATA_DIR/iclevr")
    data.add_argument("--train-json", help="training labels, if not DATA_DIR/train.json")
    data.add_argument("--vocabulary", help="label vocabulary json (default: DATA_DIR/objects.json, else the "
                                           "project's object.json)")
    data.add_argument("--cache-dir", default=str(dataset.DEFAULT_CACHE_DIR),
                      help="where decoded images are cached (default: $ICLEVR_CACHE_DIR or ~/.cache/iclevr-ddpm)")
    data.add_argument("--no-flip", action="store_true", help="do not mirror training images at random")

    model = p.add_argument_group("model and diffusion")
    model.add_argument("--preset", default="small", choices=list(PRESETS),
                       help="UNet size: seed (report, ~114M), base (GPU), small (CPU, ~3M), cpu (~3M, 4x4 folded "
                            "pixels), tokens (the CPU recipe: object tokens by cross-attention, denoising at 32x32, "
                            "~4M), tiny and tiny-tokens (tests)")
    model.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                       help="override one field of the preset, e.g. block_out_channels=[32,64,128] or "
                            "resnet_time_scale_shift=scale_shift (repeatable; values are JSON or plain strings)")
    model.add_argument("--beta-schedule", default="linear", choices=["linear", "cosine"],
                       help="DDPM noise schedule; cosine is diffusers' squaredcos_cap_v2")
    model.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    model.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                       help="what the UNet predicts; the loss is the MSE on it")
    model.add_argument("--snr-gamma", type=float, default=0,
                       help="min-SNR loss weighting with this gamma (Hang et al. 2023; 5 is typical; 0 = plain MSE)")
    model.add_argument("--object-weight", type=float, default=1.0,
                       help="loss weight of object pixels (coloured or unlike the smooth floor around them) "
                            "relative to the floor; 1 = plain MSE")
    model.add_argument("--timestep-power", type=float, default=1.0,
                       help="draw training timesteps with density proportional to (t/T)^(P-1): 1 = uniform, 2 = "
                            "linearly more high-noise steps, where which object to draw is decided")
    model.add_argument("--cond-drop", type=float, default=0.1,
                       help="probability of training on the all-zero (unconditional) label vector, so the same "
                            "model serves classifier-free guidance")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=64, help="images per step and process")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up before the LR schedule")
    opt.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                     help="after warm-up: cosine decay to 0 at the last step, or constant (for runs whose length "
                          "is set by --max-minutes, with EMA doing the averaging)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    opt.add_argument("--ema-decay", type=float, default=0.9999,
                     help="largest EMA decay; EMA warm-up (power 2/3) keeps it lower early in training")
    opt.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                     help="auto: bf16 on a GPU that supports it, fp32 on CPU")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet (slow first steps; see docs/RESULTS.md for when it pays)")
    opt.add_argument("--max-bad-steps", type=int, default=0,
                     help="skip up to this many steps with a non-finite loss before stopping (default: stop "
                          "at the first)")

    length = p.add_argument_group("length and checkpoints")
    length.add_argument("--max-steps", type=int, help="total optimisation steps (overrides --epochs)")
    length.add_argument("--epochs", type=float, default=100, help="total passes over the data")
    length.add_argument("--max-minutes", type=float,
                        help="stop this invocation after so many minutes: checkpoint, export, exit 0")
    length.add_argument("--out", default="runs/default", help="run folder")
    length.add_argument("--resume", help="'latest' (the newest checkpoint in --out; a new run starts from step 0) "
                                         "or a checkpoint folder to continue from")
    length.add_argument("--init", metavar="MODEL",
                        help="start a new run from the weights of a trained model folder of the same --preset and "
                             "--prediction-type, e.g. pretrained/iclevr-tokens (fine-tuning: fresh optimizer and "
                             "schedule, step 0); ignored when --resume finds a checkpoint")
    length.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    length.add_argument("--keep", type=int, default=3, help="how many recent checkpoints to keep")
    length.add_argument("--log-every", type=int, default=50, help="steps between metrics.jsonl lines")
    length.add_argument("--seed", type=int, default=0, help="seeds weights, data order, noise and dropout")

    meter = p.add_argument_group("conditioning meter (are the labels used?)")
    meter.add_argument("--meter-every", type=int, default=200,
                       help="steps between measurements of the share of the held-out denoising loss that the true "
                            "labels remove (loss with the all-zero label minus loss with the true labels, over the "
                            "former), per band of timesteps, into metrics.jsonl and curves.png (0 = off, and no "
                            "scenes are held out)")
    meter.add_argument("--meter-images", type=int, default=96,
                       help="images of whole held-out scenes (at most a tenth of the data) kept out of training "
                            "for the meter; they lie inside the evaluator's held-out scenes (split seed 0)")

    evaluation = p.add_argument_group("evaluation during training (EMA weights, main process)")
    evaluation.add_argument("--eval-every", type=int, default=0,
                            help="steps between evaluations (0 = never); needs --evaluator")
    evaluation.add_argument("--eval-every-minutes", type=float, default=0,
                            help="also evaluate after every so many minutes of training (accuracy vs wall time)")
    evaluation.add_argument("--evaluator", help="evaluator checkpoint (course format, see evaluator.py)")
    evaluation.add_argument("--eval-conditions", nargs="+", metavar="FILE",
                            help="condition files or random:N[:SEED] (default: DATA_DIR/test.json, "
                                 "DATA_DIR/new_test.json)")
    evaluation.add_argument("--eval-sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                            help="sampler for evaluation (this and the other --eval-* sampling settings are also "
                                 "written to the exported model's sampling.json: sample.py's and evaluate.py's "
                                 "defaults for it)")
    evaluation.add_argument("--eval-steps", type=int, default=50, help="denoising steps for evaluation")
    evaluation.add_argument("--eval-guidance", type=float, default=1.0, help="guidance scale for evaluation")
    evaluation.add_argument("--eval-guidance-max-t", type=int,
                            help="guide only timesteps below this during evaluation (default: every step)")
    args = p.parse_args(argv)
    args.model_options = dict(parse_model_option(p, text) for text in args.model_option)
    if (args.eval_every or args.eval_every_minutes) and not args.evaluator:
        p.error("--eval-every needs --evaluator (train one with: python evaluator.py train)")
    for name in ("batch_size", "timesteps", "checkpoint_every", "keep", "log_every", "eval_steps", "meter_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.timestep_power <= 0:
        p.error("--timestep-power must be positive")
    if args.meter_every < 0:
        p.error("--meter-every must be 0 (off) or more")
    if not 0 <= args.cond_drop < 1:
        p.error("--cond-drop must be in [0, 1)")
    return args


def parse_model_option(parser, text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--model-option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ---------------------------------------------------------------------------------------------------------
# The run folder: one writer, atomic checkpoints


def lock_run_dir(run_dir):
    """An flock on RUN/.lock: a second train.py on the same run refuses; the kernel drops the lock when its
    holder dies, even by SIGKILL, so a stale lock file is simply taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise UserError(f"{run_dir} is in use by another train.py (pid {holder}); wait for it or pick another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def remove_partial_writes(run_dir):
    """Temporary folders left by a process killed while writing: never read, so simply deleted."""
    for leftover in [*run_dir.glob(".tmp-*"), *run_dir.glob(".old-*"), *(run_dir / "checkpoints").glob(".tmp-*"),
                     *(run_dir / "checkpoints").glob(".old-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def checkpoint_dirs(run_dir):
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    folder = run_dir / "checkpoints"
    found = [d for d in folder.glob("step-*") if (d / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def export_pipeline(model, ema, noise_scheduler, folder, sampling=None):
    """Save the EMA weights as an ICLEVRPipeline folder (written to a temporary name, then moved), with the
    sampling settings it was evaluated with (sampling.json), if any."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    ICLEVRPipeline(unet=model, scheduler=noise_scheduler).save_pretrained(temp)
    ema.restore(model.parameters())
    if sampling:
        write_sampling_settings(temp, sampling)
    dataset.publish_dir(temp, folder)


def save_checkpoint(run_dir, step, train_seconds, model, ema, optimizer, lr_scheduler, noise_scheduler, keep,
                    sampling=None):
    """checkpoints/step-N/: the EMA pipeline (loadable by sample.py), raw weights, optimizer, LR schedule."""
    folder = run_dir / "checkpoints"
    temp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    temp.mkdir(parents=True)
    export_pipeline(model, ema, noise_scheduler, temp / "pipeline", sampling)
    save_file(model.state_dict(), temp / "model.safetensors")
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), temp / "lr_scheduler.pt")
    ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    state = {"step": step, "train_seconds": train_seconds, "ema": ema_state}
    (temp / "state.json").write_text(json.dumps(state, indent=1))
    final = folder / f"step-{step:08d}"
    dataset.publish_dir(temp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir, resume):
    """--resume latest: the newest complete checkpoint, or None on a new run (so a pre-emptible job can use
    the same command line for its first start and every restart)."""
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"{path}: not a checkpoint folder (expected RUN/checkpoints/step-N)")
    return path


def check_compatible(saved_config, model, where):
    """Refuse a checkpoint of another architecture or vocabulary with a message that names the difference.
    `saved_config` is a saved config.json's content or a loaded model's config; both sides are compared as JSON."""
    current, saved_config = (json.loads(json.dumps(dict(config))) for config in (model.config, saved_config))
    saved_names, names = saved_config.get("label_names"), current["label_names"]
    if saved_names != names:
        saved_names = saved_names or ["none"]
        raise UserError(f"{where} was trained with another label vocabulary ({len(saved_names)} labels, first "
                        f"{saved_names[0]!r}) than this run ({len(names)} labels, first {names[0]!r})")
    for key, value in sorted(saved_config.items(), key=lambda item: item[0] != "preset"):  # preset first
        if not key.startswith("_") and key in current and current[key] != value:
            raise UserError(f"{where} has {key}={value}, but this run has {key}={current[key]} "
                            f"(use the same --preset and --model-option as the checkpoint)")


def initialise_from(path, model, prediction_type):
    """--init: copy the UNet weights of a trained model folder into the freshly built `model`."""
    pipe = load_pipeline(path)
    check_compatible(pipe.unet.config, model, path)
    if pipe.scheduler.config.prediction_type != prediction_type:
        raise UserError(f"{path} predicts {pipe.scheduler.config.prediction_type}, but this run trains "
                        f"{prediction_type} (pass --prediction-type {pipe.scheduler.config.prediction_type})")
    model.load_state_dict(pipe.unet.state_dict())


def load_checkpoint(path, model, ema, optimizer, lr_scheduler):
    """Restore everything save_checkpoint wrote; returns (step, training seconds so far)."""
    try:
        unet_config = json.loads((path / "pipeline" / "unet" / "config.json").read_text())
        check_compatible(unet_config, model, path)
        model.load_state_dict(load_file(path / "model.safetensors"))
        state = json.loads((path / "state.json").read_text())
        ema_weights = type(model).from_pretrained(path / "pipeline" / "unet")
        ema.load_state_dict({**state["ema"], "shadow_params": [p.data for p in ema_weights.parameters()]})
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot resume from this checkpoint ({str(error).splitlines()[0][:160]})")
    return state["step"], state.get("train_seconds", 0.0)


# ---------------------------------------------------------------------------------------------------------
# Metrics


def append_metrics(run_dir, record):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the half-written last line of a killed run
    return records


def truncate_metrics(run_dir, step):
    """After a resume, drop what was logged past the checkpoint: those steps are trained again."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    with dataset.replacing(run_dir / "metrics.jsonl") as temp:
        temp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(run_dir):
    """curves.png: training loss, the conditioning meter and evaluator accuracy, where they were measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    share_keys = sorted({k for r in records for k in r if k.startswith(SHARE_PREFIX)},
                        key=lambda k: int(k[len(SHARE_PREFIX):]))
    accuracy_keys = sorted({k for r in records for k in r if k.startswith("acc_")})
    panels = 1 + bool(share_keys) + bool(accuracy_keys)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    loss_axis = axes.pop(0)
    loss_axis.plot([r["step"] for r in losses], [r["loss"] for r in losses])
    loss_axis.set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="loss")
    if share_keys:
        share_axis = axes.pop(0)
        for key in share_keys:
            points = [r for r in records if key in r]
            start = int(key[len(SHARE_PREFIX):])
            share_axis.plot([r["train_minutes"] for r in points], [r[key] for r in points], marker=".",
                            label=f"t {start}-{start + points[0]['meter_band'] - 1}")
        share_axis.axhline(0, color="gray", lw=0.5)
        share_axis.set(xlabel="training minutes", ylabel="share of the held-out loss the labels remove",
                       title="conditioning meter")
        share_axis.legend(fontsize=8)
    if accuracy_keys:
        accuracy_axis = axes.pop(0)
        for key in accuracy_keys:
            points = [r for r in records if key in r]
            accuracy_axis.plot([r["train_minutes"] for r in points], [r[key] for r in points], marker="o",
                               label=key[4:])
        accuracy_axis.set(xlabel="training minutes", ylabel="evaluator accuracy", ylim=(0, 1), title="accuracy")
        accuracy_axis.legend()
    fig.tight_layout()
    with dataset.replacing(run_dir / "curves.png") as temp:
        fig.savefig(temp, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Training


class StopRequest:
    """While active, SIGINT/SIGTERM only set a flag; the loop checkpoints at the end of the step and exits."""

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in EXIT_INTERRUPTED}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum)


def step_generator(seed, step, rank, device):
    """Noise, timesteps and label dropout are a pure function of (seed, step, rank): resuming needs no RNG
    state and gives the same numbers as an uninterrupted run."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


def training_batch(images, labels, batch_size, seed, step, accelerator, generator, size, flip=True):
    """This process's share of global step `step`: images in [-1, 1] at the model's denoising size `size` (half
    of them mirrored) and labels."""
    index = dataset.batch_indices(len(images), batch_size, seed, step, accelerator.process_index,
                                  accelerator.num_processes).to(images.device)
    mirror = torch.rand(len(index), generator=generator, device=images.device) < 0.5 if flip else None
    return to_sample_size(dataset.to_model_input(images[index], mirror), size), labels[index]


def object_mask(x0):
    """1 on pixels that stand out from i-CLEVR's smooth gray floor: coloured, or unlike their surroundings."""
    rgb = (x0 + 1) / 2
    saturation = rgb.amax(1) - rgb.amin(1)
    contrast = (rgb - F.avg_pool2d(rgb, 9, stride=1, padding=4, count_include_pad=False)).abs().amax(1)
    return ((saturation > 0.15) | (contrast > 0.08)).float()[:, None]


def training_timesteps(batch, num_timesteps, generator, device, power=1.0):
    """Uniform timesteps, or with density proportional to (t/T)^(power-1) for power != 1."""
    if power == 1.0:
        return torch.randint(0, num_timesteps, (batch,), generator=generator, device=device)
    u = torch.rand(batch, generator=generator, device=device)
    return (u ** (1 / power) * num_timesteps).long().clamp(max=num_timesteps - 1)


def training_loss(model, noise_scheduler, x0, labels, generator, cond_drop, snr_gamma=0.0, object_weight=1.0,
                  timestep_power=1.0):
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = training_timesteps(batch, noise_scheduler.config.num_train_timesteps, generator, x0.device, timestep_power)
    keep = torch.rand(batch, generator=generator, device=x0.device) >= cond_drop
    labels = labels * keep[:, None]  # dropped rows become the all-zero "unconditional" vector
    noisy = noise_scheduler.add_noise(x0, noise, t)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(x0, noise, t)
    prediction = model(noisy, t, labels)
    if not snr_gamma and object_weight == 1.0:
        return F.mse_loss(prediction.float(), target.float())
    error = (prediction.float() - target.float()) ** 2
    if object_weight != 1.0:
        # the few object pixels carry what the labels decide; the floor is most of the plain MSE
        error = error * (1 + (object_weight - 1) * object_mask(x0))
    per_image = error.mean((1, 2, 3))
    if snr_gamma:
        # min-SNR-gamma: cap the weight of nearly clean timesteps, whose texture details dominate plain MSE
        snr = compute_snr(noise_scheduler, t)
        per_image = per_image * snr.clamp(max=snr_gamma) / (snr if epsilon else snr + 1)
    return per_image.mean()


SHARE_PREFIX = "meter_share_t"


class ConditioningMeter:
    """Are the labels used? On fixed images of held-out scenes, with fixed noise and fixed timesteps in each of
    `bands` equal bands of t, the denoising loss with the all-zero label vector and with the true labels; per band,
    the gap (no labels - true labels) as a fraction of the loss without labels: 0 for a model that ignores its
    labels, 1 for one that needs nothing but them. The fraction, not the raw gap: epsilon-loss shrinks with the
    signal-to-noise ratio, so at high noise, where which object to draw is decided, a raw gap would be scaled
    away; the fraction means the same for epsilon and v. Fixed inputs make successive values comparable: what
    changes between two measurements is the model alone."""

    def __init__(self, data, noise_scheduler, size, bands=4, seed=0, batch_size=128):
        x0 = to_sample_size(dataset.to_model_input(torch.from_numpy(data.images)), size)
        labels = torch.from_numpy(data.labels)
        generator = torch.Generator().manual_seed(seed)
        steps = noise_scheduler.config.num_train_timesteps
        self.band = steps // bands
        t = torch.cat([torch.randint(b * self.band, (b + 1) * self.band, (len(x0),), generator=generator)
                       for b in range(bands)])
        noise = torch.randn((bands * len(x0), *x0.shape[1:]), generator=generator)
        x0, self.labels = x0.repeat(bands, 1, 1, 1), labels.repeat(bands, 1)
        self.noisy, self.t = noise_scheduler.add_noise(x0, noise, t), t
        epsilon = noise_scheduler.config.prediction_type == "epsilon"
        self.target = noise if epsilon else noise_scheduler.get_velocity(x0, noise, t)
        self.batch_size = batch_size

    @torch.no_grad()
    def per_sample_loss(self, model, labels, device):
        losses = []
        for start in range(0, len(self.t), self.batch_size):
            part = slice(start, start + self.batch_size)
            prediction = model(self.noisy[part].to(device), self.t[part].to(device), labels[part].to(device))
            losses.append(((prediction.float().cpu() - self.target[part]) ** 2).mean((1, 2, 3)))
        return torch.cat(losses)

    def __call__(self, model, device):
        was_training = model.training
        model.eval()
        conditional = self.per_sample_loss(model, self.labels, device)
        unconditional = self.per_sample_loss(model, torch.zeros_like(self.labels), device)
        model.train(was_training)
        band_of = self.t // self.band
        record = {"meter_loss": conditional.mean().item(), "meter_band": self.band,
                  "meter_share": ((unconditional - conditional).sum() / unconditional.sum()).item()}
        for b in band_of.unique().tolist():
            inside = band_of == b
            share = (unconditional[inside] - conditional[inside]).sum() / unconditional[inside].sum()
            record[f"{SHARE_PREFIX}{b * self.band}"] = share.item()
        return record


def optimisation_step(accelerator, model, optimizer, lr_scheduler, ema, loss, grad_clip):
    """Backward, gradient clipping, AdamW, LR schedule and EMA. Returns False, leaving the weights as they
    were, when the loss or the gradient is not finite on any process."""
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    if not bool(accelerator.gather(finite[None]).all()):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ema.step(accelerator.unwrap_model(model).parameters())
    return True


def prepare_model(model, compile_model=False):
    return torch.compile(model) if compile_model else model


def make_optimizer(model, lr, weight_decay):
    """AdamW with the fused kernel (one pass over all parameters, on CPU and GPU)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def make_lr_scheduler(optimizer, schedule, warmup_steps, steps):
    warmup = min(warmup_steps, steps // 10)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, steps)


def total_steps(args, num_images, world_size):
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * (num_images // (args.batch_size * world_size))))


def load_data(args):
    return dataset.load_training_set(dataset.resolve_data_dir(args.data_dir, args.cache_dir), args.image_dir,
                                     args.train_json, args.vocabulary, args.cache_dir)


def split_meter_scenes(data, args):
    """(training set, the meter's held-out images or None)."""
    if not args.meter_every:
        return data, None
    kept, held = dataset.split_off_scenes(data.filenames, min(args.meter_images, len(data) // 10))
    return (data.subset(kept), data.subset(held)) if len(held) else (data, None)


def check_object_counts(model, data):
    """An object-token model reads at most max_objects labels per image: more would be silently dropped."""
    limit = getattr(model.config, "max_objects", None)
    most = int(data.labels.sum(1).max())
    if limit is not None and most > limit:
        raise UserError(f"some training images have {most} labels, but the model reads at most {limit} "
                        f"(add --model-option max_objects={most})")


class Evaluation:
    """--eval-every: sample the condition sets with the EMA weights and score them with the evaluator."""

    def __init__(self, args, data):
        import evaluate
        import sample
        from evaluator import evaluation_model

        self.evaluate = evaluate
        self.evaluator = evaluation_model(args.evaluator)
        sources = args.eval_conditions or dataset.default_condition_files(data.data_dir)
        self.condition_sets = dict(evaluate.parse_condition_arg(text, data.vocabulary, data) for text in sources)
        self.args = args
        self.next_minutes = args.eval_every_minutes
        self.sample = sample
        # what sample.py and evaluate.py use for the exported folders when no flag overrides it
        self.sampling_settings = sample.sampling_settings(args.eval_sampler, args.eval_steps, args.eval_guidance,
                                                          args.eval_guidance_max_t)

    def due(self, step, total, train_seconds):
        if self.args.eval_every_minutes and train_seconds / 60 >= self.next_minutes:
            self.next_minutes = (train_seconds / 60 // self.args.eval_every_minutes + 1) * self.args.eval_every_minutes
            return True
        return step == total or bool(self.args.eval_every and step % self.args.eval_every == 0)

    def __call__(self, model, ema, noise_scheduler, accelerator):
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.eval()
        pipe = ICLEVRPipeline(unet=model, scheduler=sampling_scheduler(noise_scheduler.config, self.args.eval_sampler))
        pipe.set_progress_bar_config(disable=True)
        with accelerator.autocast():  # the training precision (bf16 on a GPU) for sampling too
            results, _ = self.evaluate.evaluate_model(pipe, self.evaluator, self.condition_sets, seeds=(0,),
                                                      **self.sample.generation_options(self.sampling_settings))
        model.train()
        ema.restore(model.parameters())
        return {f"acc_{name}": result["mean"] for name, result in results.items()}


def main(argv=None):
    args = parse_args(argv)
    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    run_dir = Path(args.out)
    lock = lock_run_dir(run_dir) if accelerator.is_main_process else None
    try:
        with StopRequest() as stop:
            return train(args, accelerator, run_dir, stop)
    finally:
        if lock is not None:
            lock.close()


def train(args, accelerator, run_dir, stop):
    is_main, device = accelerator.is_main_process, accelerator.device
    if is_main:
        remove_partial_writes(run_dir)
    if args.resume is None and checkpoint_dirs(run_dir):
        raise UserError(f"{run_dir} already has checkpoints: add --resume latest to continue, or pick another --out")

    with accelerator.main_process_first():  # the first process decodes and caches the images
        data, meter_data = split_meter_scenes(load_data(args), args)
    evaluation = Evaluation(args, data) if (args.eval_every or args.eval_every_minutes) and is_main else None
    sampling = evaluation.sampling_settings if evaluation else None
    images = torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device)

    torch.manual_seed(args.seed)
    model = build_model(args.preset, data.vocabulary.names, **args.model_options)
    check_object_counts(model, data)
    size = model.denoising_size
    noise_scheduler = training_scheduler(args.beta_schedule, args.timesteps, args.prediction_type)
    meter = ConditioningMeter(meter_data, noise_scheduler, size) if meter_data is not None and is_main else None
    checkpoint = find_checkpoint(run_dir, args.resume) if args.resume else None
    if args.init and not checkpoint:
        initialise_from(args.init, model, args.prediction_type)  # before the EMA copies the weights
        if is_main:
            print(f"initialised from {args.init}", file=sys.stderr)
    steps = total_steps(args, len(data), accelerator.num_processes)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, steps)
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
    start, train_seconds = 0, 0.0
    if checkpoint:
        start, train_seconds = load_checkpoint(checkpoint, model, ema, optimizer, lr_scheduler)
        if is_main:
            print(f"resumed from {checkpoint} at step {start}", file=sys.stderr)
    elif args.resume and is_main:
        print(f"no checkpoint in {run_dir} yet: starting from step 0", file=sys.stderr)
    if is_main:
        truncate_metrics(run_dir, start)  # steps logged after the checkpoint are trained (and logged) again
    ema.to(device)
    model, optimizer = accelerator.prepare(prepare_model(model, args.compile), optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # what save_pretrained needs
    if is_main:
        (run_dir / "config.json").write_text(json.dumps({**vars(args), "total_steps": steps,
                                                         "parameters": count_parameters(raw_model),
                                                         "training_images": len(data), "images_per_step":
                                                         args.batch_size * accelerator.num_processes}, indent=1))
    if meter and start == 0:
        append_metrics(run_dir, {"step": 0, "train_minutes": 0.0, **meter(raw_model, device)})

    started = time.monotonic()
    bad_steps, images_since_log, seconds_since_log = 0, 0, 0.0
    step = start
    with tqdm(total=steps, initial=start, desc="training", unit="step", disable=not is_main) as progress:
        while step < steps:
            tick = time.monotonic()
            generator = step_generator(args.seed, step, accelerator.process_index, device)
            x0, y = training_batch(images, labels, args.batch_size, args.seed, step, accelerator, generator, size,
                                   flip=not args.no_flip)
            loss = training_loss(model, noise_scheduler, x0, y, generator, args.cond_drop, args.snr_gamma,
                                 args.object_weight, args.timestep_power)
            if not optimisation_step(accelerator, model, optimizer, lr_scheduler, ema, loss, args.grad_clip):
                bad_steps += 1
                if bad_steps > args.max_bad_steps:
                    last = checkpoint_dirs(run_dir)
                    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                    raise NonFiniteLoss(f"non-finite loss ({loss.item()}) in step {step + 1}; "
                                        f"stopped without saving: {where}")
                step += 1  # skip this batch: the weights stay as they were
                progress.update(1)
                continue
            step += 1
            loss_value = loss.item()  # waits for the step to finish, so the timing below is true on a GPU too
            elapsed = time.monotonic() - tick
            train_seconds += elapsed
            seconds_since_log += elapsed
            images_since_log += len(x0) * accelerator.num_processes
            progress.update(1)

            out_of_time = args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60
            stop_flag = torch.tensor([stop.signal is not None or out_of_time], device=device)
            stop_now = bool(accelerator.gather(stop_flag).any())  # every process stops at the same step
            if is_main and step % args.log_every == 0:
                record = {"step": step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "train_minutes":
                          train_seconds / 60, "images_per_s": images_since_log / seconds_since_log}
                append_metrics(run_dir, record)
                progress.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{record['images_per_s']:.1f}")
                images_since_log, seconds_since_log = 0, 0.0
            if meter and step % args.meter_every == 0:
                append_metrics(run_dir, {"step": step, "train_minutes": train_seconds / 60, **meter(raw_model, device)})
            if evaluation and (evaluation.due(step, steps, train_seconds) or out_of_time):  # the last model too
                scores = evaluation(raw_model, ema, noise_scheduler, accelerator)
                append_metrics(run_dir, {"step": step, "train_minutes": train_seconds / 60, **scores})
                progress.write(f"step {step}: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in scores.items()))
            if is_main and (step % args.checkpoint_every == 0 or step == steps or stop_now):
                save_checkpoint(run_dir, step, train_seconds, raw_model, ema, optimizer, lr_scheduler,
                                noise_scheduler, args.keep, sampling)
                plot_curves(run_dir)
            if stop_now:
                break
    accelerator.wait_for_everyone()
    if stop.signal is not None:
        print(f"interrupted by {stop.signal.name} at step {step}: checkpoint saved in {run_dir}/checkpoints; "
              f"continue with --resume latest", file=sys.stderr)
        return EXIT_INTERRUPTED[stop.signal]
    if is_main:
        export_pipeline(raw_model, ema, noise_scheduler, run_dir / "model", sampling)
        print(f"{'stopped after --max-minutes' if step < steps else 'done'} at step {step}: "
              f"model exported to {run_dir / 'model'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
