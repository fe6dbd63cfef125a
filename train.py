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
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dataset
from dataset import UserError, run_cli
from model import PRESETS, ConditionalUNet, ICLEVRPipeline, build_model, count_parameters, training_scheduler

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
                       help="UNet size: seed (report, ~114M), base (GPU), small (CPU, ~3M), tiny (tests)")
    model.add_argument("--beta-schedule", default="linear", choices=["linear", "cosine"],
                       help="DDPM noise schedule; cosine is diffusers' squaredcos_cap_v2")
    model.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    model.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                       help="what the UNet predicts; the loss is the MSE on it")
    model.add_argument("--cond-drop", type=float, default=0.1,
                       help="probability of training on the all-zero (unconditional) label vector, so the same "
                            "model serves classifier-free guidance")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=64, help="images per step and process")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up before the cosine decay")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    opt.add_argument("--ema-decay", type=float, default=0.9999,
                     help="largest EMA decay; EMA warm-up (power 2/3) keeps it lower early in training")
    opt.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                     help="auto: bf16 on a GPU that supports it, fp32 on CPU")
    opt.add_argument("--max-bad-steps", type=int, default=0,
                     help="skip up to this many steps with a non-finite loss before stopping (default: stop "
                          "at the first)")

    length = p.add_argument_group("length and checkpoints")
    length.add_argument("--max-steps", type=int, help="total optimisation steps (overrides --epochs)")
    length.add_argument("--epochs", type=float, default=100, help="total passes over the data")
    length.add_argument("--max-minutes", type=float,
                        help="stop this invocation after so many minutes: checkpoint, export, exit 0")
    length.add_argument("--out", default="runs/default", help="run folder")
    length.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    length.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    length.add_argument("--keep", type=int, default=3, help="how many recent checkpoints to keep")
    length.add_argument("--log-every", type=int, default=50, help="steps between metrics.jsonl lines")
    length.add_argument("--seed", type=int, default=0, help="seeds weights, data order, noise and dropout")
    args = p.parse_args(argv)
    for name in ("batch_size", "timesteps", "checkpoint_every", "keep", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.cond_drop < 1:
        p.error("--cond-drop must be in [0, 1)")
    return args


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


def fsync_tree(path):
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def publish_dir(temp, final):
    """Move a fully written folder into place so readers only ever see complete ones."""
    fsync_tree(temp)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(temp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dirs(run_dir):
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    folder = run_dir / "checkpoints"
    found = [d for d in folder.glob("step-*") if (d / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def export_pipeline(model, ema, noise_scheduler, folder):
    """Save the EMA weights as an ICLEVRPipeline folder (written to a temporary name, then moved)."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    ICLEVRPipeline(unet=model, scheduler=noise_scheduler).save_pretrained(temp)
    ema.restore(model.parameters())
    publish_dir(temp, folder)


def save_checkpoint(run_dir, step, model, ema, optimizer, lr_scheduler, noise_scheduler, keep):
    """checkpoints/step-N/: the EMA pipeline (loadable by sample.py), raw weights, optimizer, LR schedule."""
    folder = run_dir / "checkpoints"
    temp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    temp.mkdir(parents=True)
    export_pipeline(model, ema, noise_scheduler, temp / "pipeline")
    save_file(model.state_dict(), temp / "model.safetensors")
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), temp / "lr_scheduler.pt")
    ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    (temp / "state.json").write_text(json.dumps({"step": step, "ema": ema_state}, indent=1))
    final = folder / f"step-{step:08d}"
    publish_dir(temp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir, resume):
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            raise UserError(f"{run_dir}: no checkpoint to resume from (start without --resume)")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise UserError(f"{path}: not a checkpoint folder (expected RUN/checkpoints/step-N)")
    return path


def check_compatible(saved_config, model, where):
    """Refuse a checkpoint of another architecture or vocabulary with a message that names the difference."""
    current = dict(model.config)
    for key in ("label_names", "preset", "fold", "block_out_channels", "layers_per_block", "down_block_types",
                "up_block_types", "image_size"):
        if key in saved_config and list(map(str, _as_list(saved_config[key]))) != list(map(str, _as_list(current[key]))):
            if key == "label_names":
                raise UserError(f"{where} was trained with another label vocabulary "
                                f"({len(saved_config[key])} labels, first {saved_config[key][0]!r}) than this run "
                                f"({len(current[key])} labels, first {current[key][0]!r})")
            raise UserError(f"{where} has {key}={saved_config[key]}, but this run has {key}={current[key]} "
                            f"(use the same --preset as the checkpoint)")


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def load_checkpoint(path, model, ema, optimizer, lr_scheduler):
    """Restore everything save_checkpoint wrote; returns the step to continue from."""
    try:
        unet_config = json.loads((path / "pipeline" / "unet" / "config.json").read_text())
        check_compatible(unet_config, model, path)
        model.load_state_dict(load_file(path / "model.safetensors"))
        state = json.loads((path / "state.json").read_text())
        ema_weights = ConditionalUNet.from_pretrained(path / "pipeline" / "unet")
        ema.load_state_dict({**state["ema"], "shadow_params": [p.data for p in ema_weights.parameters()]})
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot resume from this checkpoint ({str(error).splitlines()[0][:160]})")
    return state["step"]


# ---------------------------------------------------------------------------------------------------------
# Metrics


def append_metrics(run_dir, record):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir, step):
    """After a resume, drop what was logged past the checkpoint: those steps are trained again."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    temp = run_dir / f".metrics-{os.getpid()}.jsonl"
    temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(temp, run_dir / "metrics.jsonl")


def plot_curves(run_dir):
    """curves.png: training loss, and evaluator accuracy where it was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    accuracy_keys = sorted({k for r in records for k in r if k.startswith("acc_")})
    fig, axes = plt.subplots(1, 2 if accuracy_keys else 1, figsize=(11 if accuracy_keys else 6, 4), squeeze=False)
    axes[0, 0].plot([r["step"] for r in losses], [r["loss"] for r in losses])
    axes[0, 0].set(xlabel="step", ylabel="training loss (MSE)", yscale="log", title="loss")
    for key in accuracy_keys:
        points = [r for r in records if key in r]
        axes[0, 1].plot([r["step"] for r in points], [r[key] for r in points], marker="o", label=key[4:])
    if accuracy_keys:
        axes[0, 1].set(xlabel="step", ylabel="evaluator accuracy", ylim=(0, 1), title="accuracy")
        axes[0, 1].legend()
    fig.tight_layout()
    temp = run_dir / f".curves-{os.getpid()}.png"
    fig.savefig(temp, dpi=90)
    plt.close(fig)
    os.replace(temp, run_dir / "curves.png")


# ---------------------------------------------------------------------------------------------------------
# Training


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self):
        self.signal = None
        for sig in EXIT_INTERRUPTED:
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum)


def step_generator(seed, step, rank, device):
    """Noise, timesteps and label dropout are a pure function of (seed, step, rank): resuming needs no RNG
    state and gives the same numbers as an uninterrupted run."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


def training_loss(model, noise_scheduler, x0, labels, generator, cond_drop):
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator,
                      device=x0.device)
    keep = torch.rand(batch, generator=generator, device=x0.device) >= cond_drop
    labels = labels * keep[:, None]  # dropped rows become the all-zero "unconditional" vector
    noisy = noise_scheduler.add_noise(x0, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(x0, noise, t)
    prediction = model(noisy, t, labels)
    return F.mse_loss(prediction.float(), target.float())


def total_steps(args, num_images, world_size):
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * (num_images // (args.batch_size * world_size))))


def load_data(args):
    data_dir = args.data_dir
    if data_dir == dataset.SYNTHETIC:
        import synthetic
        data_dir = synthetic.ensure_dataset(Path(args.cache_dir))
    return dataset.load_training_set(data_dir, args.image_dir, args.train_json, args.vocabulary, args.cache_dir)


def main(argv=None):
    args = parse_args(argv)
    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    is_main, device = accelerator.is_main_process, accelerator.device
    run_dir = Path(args.out)
    lock = lock_run_dir(run_dir) if is_main else None
    if args.resume is None and checkpoint_dirs(run_dir):
        raise UserError(f"{run_dir} already has checkpoints: add --resume latest to continue, or pick another --out")

    with accelerator.main_process_first():  # the first process decodes and caches the images
        data = load_data(args)
    images = torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device)

    torch.manual_seed(args.seed)
    model = build_model(args.preset, data.vocabulary.names)
    noise_scheduler = training_scheduler(args.beta_schedule, args.timesteps, args.prediction_type)
    steps = total_steps(args, len(data), accelerator.num_processes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, steps // 10), steps)
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
    start = 0
    if args.resume:
        checkpoint = find_checkpoint(run_dir, args.resume)
        start = load_checkpoint(checkpoint, model, ema, optimizer, lr_scheduler)
        if is_main:
            truncate_metrics(run_dir, start)
            print(f"resumed from {checkpoint} at step {start}", file=sys.stderr)
    ema.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if is_main:
        (run_dir / "config.json").write_text(json.dumps({**vars(args), "total_steps": steps,
                                                         "parameters": count_parameters(raw_model)}, indent=1))

    stop = StopRequest()
    started = last_log = time.monotonic()
    bad_steps, images_since_log = 0, 0
    step = start
    progress = tqdm(total=steps, initial=start, desc="training", unit="step", disable=not is_main)
    while step < steps:
        generator = step_generator(args.seed, step, accelerator.process_index, device)
        index = dataset.batch_indices(len(data), args.batch_size, args.seed, step, accelerator.process_index,
                                      accelerator.num_processes).to(device)
        flip = None if args.no_flip else torch.rand(len(index), generator=generator, device=device) < 0.5
        x0 = dataset.to_model_input(images[index], flip)
        loss = training_loss(model, noise_scheduler, x0, labels[index], generator, args.cond_drop)
        finite = bool(accelerator.gather(torch.isfinite(loss.detach())[None]).all())
        if not finite:
            bad_steps += 1
            if bad_steps > args.max_bad_steps:
                last = checkpoint_dirs(run_dir)
                where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}; stopped without saving: {where}")
            optimizer.zero_grad(set_to_none=True)
            step += 1  # skip this batch: the weights stay as they were
            progress.update(1)
            continue
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(raw_model.parameters())
        step += 1
        images_since_log += len(index) * accelerator.num_processes
        progress.update(1)

        out_of_time = args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60
        stop_now = bool(accelerator.gather(torch.tensor([stop.signal is not None or out_of_time], device=device)).any())
        if step % args.log_every == 0 and is_main:
            now = time.monotonic()
            record = {"step": step, "loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0],
                      "images_per_s": images_since_log / (now - last_log), "minutes": (now - started) / 60}
            append_metrics(run_dir, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            last_log, images_since_log = now, 0
        if is_main and (step % args.checkpoint_every == 0 or step == steps or stop_now):
            save_checkpoint(run_dir, step, raw_model, ema, optimizer, lr_scheduler, noise_scheduler, args.keep)
            plot_curves(run_dir)
        if stop_now:
            break
    progress.close()
    accelerator.wait_for_everyone()
    if stop.signal is not None:
        print(f"interrupted by {stop.signal.name} at step {step}: checkpoint saved in {run_dir}/checkpoints; "
              f"continue with --resume latest", file=sys.stderr)
        return EXIT_INTERRUPTED[stop.signal]
    if is_main:
        export_pipeline(raw_model, ema, noise_scheduler, run_dir / "model")
        print(f"{'stopped after --max-minutes' if step < steps else 'done'} at step {step}: "
              f"model exported to {run_dir / 'model'}", file=sys.stderr)
    if lock is not None:
        lock.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
