"""The run folder: one writer at a time, and checkpoints that are complete, verified, or set aside.

checkpoints/step-N/ holds the EMA pipeline (itself a loadable model folder, pipeline/), the raw weights
(model.safetensors), the optimizer, the LR schedule, state.json (step, training seconds, EMA counters) and
manifest.json (every file's size and SHA-256). Each is written under a temporary name and moved into place, so a
killed run leaves complete checkpoints only; one damaged later is found by its manifest when a run resumes,
renamed to damaged-step-N (kept for the user, out of --keep rotation) and skipped for the newest intact one.
"""
import contextlib
import fcntl
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cli import MANIFEST, UserError, manifest_problem, publish_dir, read_json, warn
from model import ICLEVRPipeline, Upsampler, find_model_dir, load_pipeline


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


@contextlib.contextmanager
def open_run_dir(run_dir, is_main, resume):
    """A training script's hold on its run folder: locked by the main process, what a killed write left cleared,
    and a new run (`resume` None) refused where checkpoints already are."""
    lock = lock_run_dir(run_dir) if is_main else None
    try:
        if is_main:
            remove_partial_writes(run_dir)
        if resume is None and checkpoint_dirs(run_dir):
            raise UserError(f"{run_dir} already has checkpoints: add --resume latest to continue, or pick another "
                            "--out")
        yield
    finally:
        if lock is not None:
            lock.close()


def remove_partial_writes(run_dir):
    """Temporary folders left by a process killed while writing: never read, so simply deleted."""
    for leftover in [*run_dir.glob(".tmp-*"), *run_dir.glob(".old-*"), *(run_dir / "checkpoints").glob(".tmp-*"),
                     *(run_dir / "checkpoints").glob(".old-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def checkpoint_dirs(run_dir):
    """Published checkpoints, oldest first (temporary folders of an interrupted write and set-aside damaged
    ones are not among them)."""
    folder = run_dir / "checkpoints"
    found = [d for d in folder.glob("step-*") if d.is_dir()] if folder.is_dir() else []
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def export_pipeline(model, ema, noise_scheduler, folder, sampling=None, upsampler=None):
    """Save the EMA weights as an ICLEVRPipeline folder (written to a temporary name, then moved), with the
    sampling settings it was evaluated with (sampling.json) and the run's learned upsampler, if any."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    ICLEVRPipeline(unet=model, scheduler=noise_scheduler, upsampler=upsampler).save_pretrained(temp)
    ema.restore(model.parameters())
    if sampling:
        sampling.write(temp)
    publish_dir(temp, folder, manifest=True)


def save_checkpoint(run_dir, step, train_seconds, model, ema, optimizer, lr_scheduler, noise_scheduler, keep,
                    sampling=None, upsampler=None):
    """checkpoints/step-N/: the EMA pipeline (loadable by sample.py), raw weights, optimizer, LR schedule."""
    folder = run_dir / "checkpoints"
    temp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    temp.mkdir(parents=True)
    export_pipeline(model, ema, noise_scheduler, temp / "pipeline", sampling, upsampler)
    save_file(model.state_dict(), temp / "model.safetensors")
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), temp / "lr_scheduler.pt")
    ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    state = {"step": step, "train_seconds": train_seconds, "ema": ema_state, "manifest": MANIFEST}
    (temp / "state.json").write_text(json.dumps(state, indent=1))
    final = folder / f"step-{step:08d}"
    publish_dir(temp, final, manifest=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_damage(folder):
    """What is wrong with a checkpoint folder, in a phrase that names the file, or None when it is intact.
    One written before checkpoints carried manifests (its state.json does not name one) cannot be checked: None,
    after a one-line note."""
    if (folder / MANIFEST).is_file():
        return manifest_problem(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        return f"{MANIFEST} and state.json are missing"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"{MANIFEST} is missing and state.json is not readable"
    if isinstance(state, dict) and "manifest" in state:
        return f"{MANIFEST} is missing"
    warn(f"{folder} was written without a manifest (an older run): it cannot be verified")
    return None


def set_aside(folder):
    """Rename a damaged checkpoint to damaged-step-N[-K]: kept for the user, never rotated away or overwritten."""
    for k in range(1, 1000):
        target = folder.with_name(f"damaged-{folder.name}" + (f"-{k}" if k > 1 else ""))
        if not target.exists():
            os.rename(folder, target)
            return target
    raise UserError(f"{folder.parent}: too many damaged checkpoints set aside; remove some damaged-step-* folders")


def find_checkpoint(run_dir, resume, set_aside_damaged=True):
    """--resume latest: the newest intact checkpoint (damaged newer ones are named in one line each and, with
    `set_aside_damaged` (the main process), set aside), or None on a new run, so a pre-emptible job can use the
    same command line for its first start and every restart. --resume PATH: that checkpoint, if intact."""
    if resume == "latest":
        damaged = 0
        for folder in reversed(checkpoint_dirs(run_dir)):
            problem = checkpoint_damage(folder)
            if problem is None:
                return folder
            damaged += 1
            if set_aside_damaged:
                kept = set_aside(folder)
                warn(f"{folder} is damaged ({problem}): kept as {kept.name}, trying the one before it")
        if damaged:
            raise UserError(f"{run_dir}/checkpoints: no intact checkpoint left ({damaged} damaged, kept as "
                            f"damaged-step-*); start again with another --out")
        return None
    path = Path(resume)
    if not path.is_dir() or not any((path / name).exists() for name in ("state.json", MANIFEST)):
        raise UserError(f"{path}: not a checkpoint folder (expected RUN/checkpoints/step-N)")
    problem = checkpoint_damage(path)
    if problem is not None:
        raise UserError(f"{path} is damaged ({problem}): resume from another checkpoint, or --resume latest for "
                        f"the newest intact one")
    return path


def check_compatible(saved_config, model, where, free=()):
    """Refuse a checkpoint of another architecture or vocabulary with a message that names the difference.
    `saved_config` is a saved config.json's content or a loaded model's config; both sides are compared as JSON.
    Keys in `free` may differ."""
    current, saved_config = (json.loads(json.dumps(dict(config))) for config in (model.config, saved_config))
    saved_names, names = saved_config.get("label_names"), current["label_names"]
    if saved_names != names:
        saved_names = saved_names or ["none"]
        raise UserError(f"{where} was trained with another label vocabulary ({len(saved_names)} labels, first "
                        f"{saved_names[0]!r}) than this run ({len(names)} labels, first {names[0]!r})")
    for key, value in sorted(saved_config.items(), key=lambda item: item[0] != "preset"):  # preset first
        if key == "trained_objects" or key in free:  # trained_objects: what the run's data holds, not the model
            continue
        if not key.startswith("_") and key in current and current[key] != value:
            raise UserError(f"{where} has {key}={value}, but this run has {key}={current[key]} "
                            f"(use the same --preset and --model-option as the checkpoint)")


TOKEN_OPTIONS = ("max_objects", "null_tokens")  # how many object tokens a model reads: not in its weights


def initialise_from(path, model, prediction_type):
    """--init: copy the UNet weights of a trained model folder into the freshly built `model`; returns the
    folder's learned upsampler (None without one), which the run's exports then carry."""
    pipe = load_pipeline(path)
    check_compatible(pipe.unet.config, model, path, free=TOKEN_OPTIONS)
    before, after = (config.get("max_objects") for config in (pipe.unet.config, model.config))
    if before is not None and after > before and model.config.get("null_tokens") is None:
        warn(f"{path} read {before} object tokens and this run reads {after}: more null tokens change what it "
             f"draws for every request (--model-option null_tokens={before} keeps its requests of up to {before} "
             f"objects as they were)")
    if pipe.scheduler.config.prediction_type != prediction_type:
        raise UserError(f"{path} predicts {pipe.scheduler.config.prediction_type}, but this run trains "
                        f"{prediction_type} (pass --prediction-type {pipe.scheduler.config.prediction_type})")
    model.load_state_dict(pipe.unet.state_dict())
    return pipe.upsampler


def objects_read_by(path):
    """The largest scene the model folder at `path` read in training (its config's trained_objects; 0 for a
    folder from before models recorded it)."""
    config = read_json(find_model_dir(path) / "unet" / "config.json", "UNet config")
    return int(config.get("trained_objects") or 0)


def checkpoint_upsampler(path):
    """The learned upsampler a checkpoint's pipeline carries (from the run's --init), or None."""
    folder = path / "pipeline" / "upsampler"
    return Upsampler.from_pretrained(folder) if folder.is_dir() else None


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
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as error:  # only a checkpoint without a manifest gets here damaged
        raise UserError(f"{path}: cannot resume from this checkpoint ({str(error).splitlines()[0][:160]})")
    return state["step"], state.get("train_seconds", 0.0)
