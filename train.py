"""Train the class-conditioned DDPM on i-CLEVR.

    python train.py --preset small --data-dir data --out runs/small          # CPU
    accelerate launch train.py --preset seed --data-dir data --out runs/seed  # one or more GPUs

The run folder holds checkpoints/ (the last --keep, each written atomically), metrics.jsonl, curves.png and,
at the end, model/ (the EMA weights as an ICLEVRPipeline folder for sample.py and evaluate.py).
"""
import argparse
import difflib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from torchvision.utils import make_grid

import checkpoints
import dataset
import metrics
import synthetic
from cli import UserError, read_json, run_cli
from model import (PRESETS, ICLEVRPipeline, build_model, count_parameters, fast_bf16, sampling_scheduler,
                   training_scheduler)
from sampling import SamplingSettings, add_sampling_flags, sampling_flags
from training import (NonFiniteLoss, StopRequest, TrainingBar, finish_run, make_lr_scheduler,
                      make_optimizer, optimisation_step, parse_model_option, prepare_model, step_generator,
                      training_batch, training_loss)

# Presets whose training step bf16 autocast makes faster on a CPU with AMX-BF16 (bench/train_throughput.py,
# docs/RESULTS.md): tokens 1.12x, tokens-wide 1.6x, small 1.09x, seed 2.8x; with AVX512-BF16 (AMD Zen 4), tokens
# 1.12x, tokens-wide 1.62x. tiny (0.80x) and cpu (0.85x) are
# slower in bf16, so --mixed-precision auto keeps them in fp32.
CPU_BF16_PRESETS = {"small", "tokens", "tokens-wide", "seed"}
REPORTERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to: the package each needs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", metavar="FILE",
                   help="a recipe (recipes/*.json): this script's flags without their dashes, with their values, e.g. "
                        '{"preset": "tokens-wide", "lr": 5e-4, "no-flip": true}; a flag on the command line '
                        "overrides the file's (--model-option adds to its list); config.json records the result")
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
    data.add_argument("--composite-scenes", type=int, default=0, metavar="N",
                      help="add N training images of one object more than the data's largest scenes (4 on "
                           "i-CLEVR), each a largest scene with an object of another training scene pasted in "
                           "(dataset.composite_scenes): the model then draws that many objects jointly, and "
                           "composes only beyond (default 0: the data as it is)")
    data.add_argument("--composite-pastes", type=int, default=1, metavar="K",
                      help="paste up to K objects into each composite: the --composite-scenes are shared evenly "
                           "between 1..K pasted objects (4..3+K objects on i-CLEVR), each round pasting into the "
                           "round before's composites; an object-token model then needs --model-option "
                           "max_objects=3+K (default 1)")
    data.add_argument("--composite-shares", type=int, nargs="+", metavar="W",
                      help="weigh the --composite-scenes between 1..K pasted objects, one weight each: "
                           "--composite-scenes 15000 --composite-pastes 3 --composite-shares 3 1 1 makes 9000 "
                           "composites of 4 objects, 3000 of 5 and 3000 of 6 (default: even)")

    model = p.add_argument_group("model and diffusion")
    model.add_argument("--preset", default="small", choices=list(PRESETS),
                       help="UNet size: seed (report, ~114M), base (GPU), small (CPU, ~3M), cpu (~3M, 4x4 folded "
                            "pixels), tokens (the CPU recipe: object tokens by cross-attention, denoising at 32x32, "
                            "~4M), tokens-wide (the same at twice the width, ~17M: the shipped model; best with "
                            "bf16), tiny and tiny-tokens (tests)")
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
                     help="auto: bf16 where it is faster, on a GPU that supports it, or on a CPU with AMX-BF16 or "
                          f"AVX512-BF16 for the presets it speeds up there ({', '.join(sorted(CPU_BF16_PRESETS))}; "
                          "as good as fp32 at equal steps: docs/RESULTS.md); fp32 elsewhere")
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
    length.add_argument("--report-to", default="none", choices=REPORTERS,
                        help="also send every metrics.jsonl number, and a sample grid at each evaluation, to "
                             "accelerate's tracker: tensorboard writes RUN/tensorboard (tensorboard --logdir "
                             "RUN/tensorboard); wandb where it is installed (default: none, metrics.jsonl and "
                             "curves.png only)")
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
    settings = p.add_argument_group("sampling settings of the evaluation", "also written to the exported model's "
                                    "sampling.json: sample.py's and evaluate.py's defaults for it")
    add_sampling_flags(settings, default_from=None, prefix="eval-",
                       precision_default="the training precision (bf16 where it trains in bf16)")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe")
    path = recipe.parse_known_args(argv)[0].recipe
    args = p.parse_args([*recipe_arguments(path, p), *argv] if path else argv)
    args.model_options = dict(parse_model_option(p, text) for text in args.model_option)
    if (args.eval_every or args.eval_every_minutes) and not args.evaluator:
        p.error("--eval-every needs --evaluator (train one with: python evaluator.py train)")
    for name in ("batch_size", "timesteps", "checkpoint_every", "keep", "log_every", "meter_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.timestep_power <= 0:
        p.error("--timestep-power must be positive")
    if args.meter_every < 0:
        p.error("--meter-every must be 0 (off) or more")
    composite_problem = dataset.composite_flags_problem(args.composite_scenes, args.composite_pastes,
                                                        args.composite_shares)
    if composite_problem:
        p.error(composite_problem)
    if not 0 <= args.cond_drop < 1:
        p.error("--cond-drop must be in [0, 1)")
    if args.report_to != "none" and importlib.util.find_spec(REPORTERS[args.report_to]) is None:
        p.error(f"--report-to {args.report_to} needs the {REPORTERS[args.report_to]} package (pip install "
                f"{REPORTERS[args.report_to]})")
    try:
        SamplingSettings.resolve({}, **sampling_flags(args, "eval-"))
    except UserError as error:  # its messages name sample.py's flags
        p.error(str(error).replace("--", "--eval-"))
    return args


def recipe_arguments(path, parser):
    """A recipe file as command-line arguments, to stand before the command line's own (argparse keeps the last
    value of a flag, so the command line wins). Its "about" entry is a description, not a flag."""
    recipe = read_json(Path(path), "recipe")
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a JSON object of flags without their dashes, e.g. {{\"lr\": 5e-4}}")
    actions = {option[2:]: action for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option not in ("--help", "--recipe")}
    arguments = []
    for key, value in recipe.items():
        if key == "about":
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=3, cutoff=0.5)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise UserError(f"{path}: {key!r} is not a flag of train.py{hint}")
        flag, action = f"--{key}", actions[key]
        if isinstance(value, bool) and action.nargs == 0:  # a switch: true sets it, false leaves it off
            arguments += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            arguments += [part for item in items for part in (flag, str(item))]
        elif isinstance(value, list):
            arguments += [flag, *map(str, value)]
        else:
            arguments += [flag, str(value)]
    return arguments


# ---------------------------------------------------------------------------------------------------------
# Training


def record_metrics(run_dir, accelerator, record):
    """One line of metrics.jsonl, and its numbers to the --report-to tracker (none: nothing more)."""
    metrics.append_metrics(run_dir, record)
    accelerator.log({key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))},
                    step=record["step"])


def log_sample_grids(accelerator, images, step):
    """Each evaluated set's first 32 images ({name: uint8 NHWC}), as one grid, to the --report-to tracker."""
    if not accelerator.trackers:  # no grids to draw
        return
    for name, drawn in images.items():
        grid = make_grid(torch.from_numpy(drawn[:32]).permute(0, 3, 1, 2), nrow=8).permute(1, 2, 0).numpy()
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({f"samples/{name}": grid[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({f"samples/{name}": [grid]}, step=step)


def total_steps(args, num_images, world_size):
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * (num_images // (args.batch_size * world_size))))


def load_data(args):
    return dataset.load_training_set(synthetic.resolve_data_dir(args.data_dir, args.cache_dir), args.image_dir,
                                     args.train_json, args.vocabulary, args.cache_dir)


def split_meter_scenes(data, args):
    """(training set, the meter's held-out images or None)."""
    if not args.meter_every:
        return data, None
    kept, held = dataset.split_off_scenes(data.filenames, min(args.meter_images, len(data) // 10))
    return (data.subset(kept), data.subset(held)) if len(held) else (data, None)


def check_object_counts(model):
    """An object-token model reads at most max_objects labels per image: more would be silently dropped."""
    limit, most = getattr(model.config, "max_objects", None), model.config.trained_objects
    if limit is not None and most > limit:
        raise UserError(f"some training images have {most} labels, but the model reads at most {limit} "
                        f"(add --model-option max_objects={most})")


class Evaluation:
    """--eval-every: sample the condition sets with the EMA weights and score them with the evaluator."""

    def __init__(self, args, data, precision="fp32"):
        import scoring
        from evaluator import evaluation_model

        self.scoring = scoring
        self.evaluator = evaluation_model(args.evaluator)
        self.evaluator.check_label_order(data.vocabulary, "the training data")
        sources = args.eval_conditions or dataset.default_condition_files(data.data_dir)
        self.condition_sets = dict(scoring.parse_condition_arg(text, data.vocabulary, data) for text in sources)
        self.args = args
        self.next_minutes = args.eval_every_minutes
        # what sample.py and evaluate.py use for the exported folders when no flag overrides it; the UNet samples in
        # the training precision where that is bf16
        flags = sampling_flags(args, "eval-")
        self.sampling_settings = SamplingSettings.resolve({}, **{**flags, "precision": flags["precision"] or precision})

    def due(self, step, total, train_seconds):
        if self.args.eval_every_minutes and train_seconds / 60 >= self.next_minutes:
            self.next_minutes = (train_seconds / 60 // self.args.eval_every_minutes + 1) * self.args.eval_every_minutes
            return True
        return step == total or bool(self.args.eval_every and step % self.args.eval_every == 0)

    def __call__(self, model, ema, noise_scheduler, upsampler=None):
        """{"acc_NAME": accuracy, ...} from the pipeline the export will have (the run's upsampler, if any);
        "eval_upsampling": "bicubic" where a model that denoises below its output size has none."""
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.eval()
        pipe = ICLEVRPipeline(unet=model, scheduler=sampling_scheduler(noise_scheduler.config,
                                                                       self.sampling_settings.sampler),
                              upsampler=upsampler)
        pipe.set_progress_bar_config(disable=True)
        results, self.images = self.scoring.evaluate_model(pipe, self.evaluator, self.condition_sets,
                                                           self.sampling_settings)  # images: for --report-to
        model.train()
        ema.restore(model.parameters())
        scores = {f"acc_{name}": result["mean"] for name, result in results.items()}
        if upsampler is None and model.denoising_size < model.config.image_size:
            scores["eval_upsampling"] = "bicubic"
        return scores


def main(argv=None):
    args = parse_args(argv)
    mixed = args.mixed_precision
    if mixed == "auto":
        if torch.cuda.is_available():
            mixed = "bf16" if fast_bf16("cuda") else "no"
        else:
            mixed = "bf16" if args.preset in CPU_BF16_PRESETS and fast_bf16("cpu") else "no"
    # accelerate keeps one process-wide state: a second main() in the same process (tests, a notebook) may ask for
    # another precision, which it would refuse. Forgetting the previous run's state lets each call choose its own.
    AcceleratorState._reset_state(reset_partial_state=True)
    run_dir = Path(args.out)
    accelerator = Accelerator(mixed_precision=mixed, log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=run_dir)
    try:
        with checkpoints.open_run_dir(run_dir, accelerator.is_main_process, args.resume), StopRequest() as stop:
            return train(args, accelerator, run_dir, stop)
    finally:
        accelerator.end_training()  # closes the trackers' files


def train(args, accelerator, run_dir, stop):
    is_main, device = accelerator.is_main_process, accelerator.device

    with accelerator.main_process_first():  # the first process decodes and caches the images
        data, meter_data = split_meter_scenes(load_data(args), args)
    # composites are pasted from the training scenes only, never from the meter's
    data = dataset.with_composite_scenes(data, args.composite_scenes, args.seed, args.composite_pastes,
                                         args.composite_shares)
    precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
    evaluation = Evaluation(args, data, precision) if (args.eval_every or args.eval_every_minutes) and is_main else None
    sampling = evaluation.sampling_settings if evaluation else None
    images = torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device)

    torch.manual_seed(args.seed)
    # the largest training scene, this data's or the --init model's where it read larger ones (a fine-tune on
    # 4-object scenes keeps drawing the 6-object ones its init learned): larger requests are drawn by composition
    trained_objects = max(int(data.labels.sum(1).max()), checkpoints.objects_read_by(args.init) if args.init else 0)
    model = build_model(args.preset, data.vocabulary.names, **{"trained_objects": trained_objects,
                                                               **args.model_options})
    check_object_counts(model)
    size = model.denoising_size
    if data.images.shape[1] < size:  # a pack made for another preset (bench/gpu_bundle.py)
        raise UserError(f"the training images are {data.images.shape[1]} pixels, but the {args.preset} preset "
                        f"denoises at {size}: make the data for this preset")
    noise_scheduler = training_scheduler(args.beta_schedule, args.timesteps, args.prediction_type)
    meter = metrics.ConditioningMeter(meter_data, noise_scheduler, size) if meter_data is not None and is_main else None
    with accelerator.main_process_first():  # the main process sets damaged checkpoints aside before others look
        checkpoint = checkpoints.find_checkpoint(run_dir, args.resume, is_main) if args.resume else None
    upsampler = checkpoints.checkpoint_upsampler(checkpoint) if checkpoint else None
    if args.init and not checkpoint:
        upsampler = checkpoints.initialise_from(args.init, model, args.prediction_type)  # before the EMA copies
        if is_main:
            carried = " (and its learned upsampler)" if upsampler is not None else ""
            print(f"initialised from {args.init}{carried}", file=sys.stderr)
    if upsampler is not None:
        upsampler.to(device)
    steps = total_steps(args, len(data), accelerator.num_processes)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, steps)
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
    start, train_seconds = 0, 0.0
    if checkpoint:
        start, train_seconds = checkpoints.load_checkpoint(checkpoint, model, ema, optimizer, lr_scheduler)
        if is_main:
            print(f"resumed from {checkpoint} at step {start}", file=sys.stderr)
    elif args.resume and is_main:
        print(f"no checkpoint in {run_dir} yet: starting from step 0", file=sys.stderr)
    if is_main:
        metrics.truncate_metrics(run_dir, start)  # steps logged after the checkpoint are trained (and logged) again
    ema.to(device)
    model, optimizer = accelerator.prepare(prepare_model(model, args.compile), optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # what save_pretrained needs
    if is_main:
        (run_dir / "config.json").write_text(json.dumps({**vars(args), "total_steps": steps,
                                                         "parameters": count_parameters(raw_model),
                                                         "training_images": len(data), "images_per_step":
                                                         args.batch_size * accelerator.num_processes,
                                                         "precision_used": accelerator.mixed_precision}, indent=1))
    if is_main and args.report_to != "none":
        accelerator.init_trackers("tensorboard" if args.report_to == "tensorboard" else "iclevr-ddpm",
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})
    if meter and start == 0:
        record_metrics(run_dir, accelerator, {"step": 0, "train_minutes": 0.0, **meter(raw_model, device)})

    started = time.monotonic()
    bad_steps, images_since_log, seconds_since_log = 0, 0, 0.0
    step = start
    progress = TrainingBar(start, steps, args.max_minutes, disable=not is_main)
    try:
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
                    raise NonFiniteLoss.in_step(step + 1, loss, run_dir)
                step += 1  # skip this batch: the weights stay as they were
                progress.update(step)
                continue
            step += 1
            loss_value = loss.item()  # waits for the step to finish, so the timing below is true on a GPU too
            elapsed = time.monotonic() - tick
            train_seconds += elapsed
            seconds_since_log += elapsed
            images_since_log += len(x0) * accelerator.num_processes

            out_of_time = args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60
            stop_flag = torch.tensor([stop.signal is not None or out_of_time], device=device)
            stop_now = bool(accelerator.gather(stop_flag).any())  # every process stops at the same step
            if is_main and step % args.log_every == 0:
                record = {"step": step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "train_minutes":
                          train_seconds / 60, "images_per_s": images_since_log / seconds_since_log}
                if device.type == "cuda":
                    record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                record_metrics(run_dir, accelerator, record)
                progress.postfix.update(loss=f"{loss_value:.4f}", img_s=f"{record['images_per_s']:.1f}")
                images_since_log, seconds_since_log = 0, 0.0
            if meter and step % args.meter_every == 0:
                record_metrics(run_dir, accelerator, {"step": step, "train_minutes": train_seconds / 60,
                                                      **meter(raw_model, device)})
            if evaluation and (evaluation.due(step, steps, train_seconds) or out_of_time):  # the last model too
                scores = evaluation(raw_model, ema, noise_scheduler, upsampler)
                record_metrics(run_dir, accelerator, {"step": step, "train_minutes": train_seconds / 60, **scores})
                log_sample_grids(accelerator, evaluation.images, step)
                progress.bar.write(f"step {step}: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in scores.items()
                                                                if k.startswith("acc_")))
            if is_main and (step % args.checkpoint_every == 0 or step == steps or stop_now):
                checkpoints.save_checkpoint(run_dir, step, train_seconds, raw_model, ema, optimizer, lr_scheduler,
                                noise_scheduler, args.keep, sampling, upsampler)
                metrics.plot_curves(run_dir)
            progress.update(step)
            if stop_now:
                break
    except BaseException:
        progress.close(finished=False)
        raise
    return finish_run(stop, progress, accelerator, run_dir, step, steps, what="model", export=lambda:
                      checkpoints.export_pipeline(raw_model, ema, noise_scheduler, run_dir / "model", sampling,
                                                  upsampler))


if __name__ == "__main__":
    run_cli(main)
