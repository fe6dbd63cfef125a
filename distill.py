"""Distillation: a student that draws in one UNet pass a step what its teacher draws in two, or in half the steps.

    python distill.py --teacher pretrained/iclevr-tokens --data-dir ../shared/data --out runs/student
    python sample.py --model runs/student/model --conditions test.json --out samples/student
    python distill.py --teacher runs/student/model --halve-steps --data-dir ../shared/data --out runs/student-10

Classifier-free guidance costs two passes a step (with the labels and without). The student is the teacher's
object-token UNet with the guidance scale w as one more input (model.ObjectTokenUNet's `guidance_embedding_dim`),
starting from the teacher's weights, where it gives the conditional output at every w. Each step noises
training images to random timesteps, as train.py does, draws w from [--guidance-min, --guidance-max], and
teaches the student the teacher's guided output eps_uncond + w * (eps_cond - eps_uncond) with the MSE (Meng et
al. 2023, stage one). The run folder is train.py's: checkpoints/ (loadable), metrics.jsonl, curves.png,
--resume latest, and at the end model/, with the teacher's upsampler and sampling.json: sample.py, evaluate.py
and the pipeline use a student as they use any model folder, at half the cost a step.

--halve-steps (progressive distillation, Salimans & Ho 2022; Meng et al.'s second stage): the student learns to
take one DDIM step for two of its teacher's (the teacher's sampling.json: DDIM, an even number of steps), from
training images noised to the student's timesteps; its sampling.json asks for half the steps. Its teacher is
usually a student of the first kind, and a student of it may be halved again (20 -> 10 -> 5).

--learn conditioning: only the weights through which the labels and the guidance scale act learn; the rest stay
the teacher's, so the student is a small difference from it (3.3 MB in fp16 for the shipped preset, where the whole
UNet is 33 MB): small enough to travel beside the teacher's weights.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel

import checkpoints
import dataset
import metrics
import synthetic
from cli import UserError, run_cli
from model import ObjectTokenUNet, count_parameters, fast_bf16, load_pipeline, sampling_scheduler
from sampling import SamplingSettings
from training import (NonFiniteLoss, StopRequest, TrainingBar, distillation_loss, finish_run, halving_loss,
                      make_lr_scheduler, make_optimizer, optimisation_step, step_generator, training_batch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="pretrained/iclevr-tokens",
                   help="the model folder to distil: an object-token model (--preset tokens or tokens-wide) "
                        "(default: the shipped model)")
    p.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR,
                   help=f"course data folder (iclevr/, train.json, objects.json), or '{dataset.SYNTHETIC}' "
                        "(default: $ICLEVR_DATA_DIR or ./data)")
    p.add_argument("--cache-dir", default=str(dataset.DEFAULT_CACHE_DIR),
                   help="where decoded images are cached (default: $ICLEVR_CACHE_DIR or ~/.cache/iclevr-ddpm)")
    p.add_argument("--composite-scenes", type=int, default=0, metavar="N",
                   help="add N composite scenes with more objects than the data's, as train.py does, so the student "
                        "learns the teacher's guidance on requests of that many objects too (default 0)")
    p.add_argument("--composite-pastes", type=int, default=1, metavar="K",
                   help="objects pasted into the composites: 1..K, as train.py's flag (default 1)")
    p.add_argument("--composite-shares", type=int, nargs="+", metavar="W",
                   help="weigh the composites between 1..K pasted objects, as train.py's flag (default: even)")
    p.add_argument("--halve-steps", action="store_true",
                   help="teach one DDIM step for two of the teacher's (its sampling.json: DDIM, an even number of "
                        "steps, one guidance scale); the student samples with half the steps (default: guidance "
                        "distillation at the teacher's steps)")
    p.add_argument("--guidance-min", type=float, default=1.0, help="smallest guidance scale w the student learns")
    p.add_argument("--guidance-max", type=float, default=5.0,
                   help="largest guidance scale w the student learns (the sampling scale must lie in the range)")
    p.add_argument("--embedding-dim", type=int, default=256, help="size of the sinusoidal embedding of w")
    p.add_argument("--learn", default="all", choices=["all", "conditioning"],
                   help="which of the student's weights learn: all of them; or conditioning, only the time embedding "
                        "(with w), its projection into every ResNet block, cross-attention, the label and token "
                        "embeddings and the norms (1.65M of tokens-wide's 16.6M parameters), the others staying the "
                        "teacher's (default all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and process")
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate (a fine-tune: low)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up before the LR schedule")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="after warm-up: cosine decay to 0 at the last step, or constant")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--ema-decay", type=float, default=0.999, help="largest EMA decay of the student's weights")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto: bf16 on a GPU that supports it or a CPU with AMX-BF16 or AVX512-BF16, else fp32")
    p.add_argument("--max-steps", type=int, default=2000, help="total optimisation steps")
    p.add_argument("--max-minutes", type=float, help="stop this invocation after so many minutes: checkpoint, "
                                                     "export, exit 0")
    p.add_argument("--out", default="runs/student", help="run folder")
    p.add_argument("--resume", help="'latest' (the newest checkpoint in --out; a new run starts from step 0) or a "
                                    "checkpoint folder to continue from")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="how many recent checkpoints to keep")
    p.add_argument("--log-every", type=int, default=25, help="steps between metrics.jsonl lines")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order, noise, timesteps and scales")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_steps", "checkpoint_every", "keep", "log_every", "embedding_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    composite_problem = dataset.composite_flags_problem(args.composite_scenes, args.composite_pastes,
                                                        args.composite_shares)
    if composite_problem:
        p.error(composite_problem)
    if not 0 <= args.guidance_min <= args.guidance_max:
        p.error(f"the guidance range [{args.guidance_min}, {args.guidance_max}] is empty or negative: "
                f"--guidance-min must be at least 0 and at most --guidance-max")
    return args


def load_teacher(path, device, halve_steps):
    """The teacher pipeline (frozen, eval mode), refusing what cannot be distilled, and its sampling settings."""
    teacher = load_pipeline(path, device)
    if not isinstance(teacher.unet, ObjectTokenUNet):
        raise UserError(f"{path}: a {type(teacher.unet).__name__}; distill.py distils object-token models "
                        f"(--preset tokens or tokens-wide)")
    if teacher.unet.distilled and not halve_steps:
        raise UserError(f"{path} is a distilled student already: give its teacher, or --halve-steps")
    teacher.unet.requires_grad_(False)
    return teacher, SamplingSettings.resolve(teacher.sampling_settings)


def halved(settings, path):
    """The student's settings for --halve-steps: the teacher's with half its DDIM steps."""
    if settings.sampler != "ddim" or settings.steps % 2:
        raise UserError(f"{path} samples with {settings.sampler} {settings.steps}: --halve-steps needs DDIM with an "
                        f"even number of steps (re-export it with --sampler ddim --steps N)")
    if settings.guidance_max_t is not None or settings.guidance_by_objects:
        raise UserError(f"{path} guides some steps or object counts differently: --halve-steps needs one guidance "
                        f"scale on every step")
    return settings.replace(steps=settings.steps // 2)


def check_guidance_range(settings, args):
    """The sampling settings the student inherits must ask for scales it learned."""
    scales = {settings.guidance_scale, *(guidance.scale for _, guidance in settings.guidance_by_objects)}
    outside = sorted(s for s in scales if not args.guidance_min <= s <= args.guidance_max)
    if outside:
        raise UserError(f"the teacher samples at guidance {outside[0]}, outside --guidance-min {args.guidance_min} "
                        f"--guidance-max {args.guidance_max}: widen the range")


def new_student(teacher_unet, embedding_dim):
    """A copy of a distilled teacher; else the teacher's UNet with a guidance input whose projection starts at
    zero: exactly the teacher's conditional output until it learns."""
    if teacher_unet.distilled:
        student = ObjectTokenUNet.from_config(teacher_unet.config)
        student.load_state_dict(teacher_unet.state_dict())
        return student
    student = ObjectTokenUNet.from_config(teacher_unet.config, guidance_embedding_dim=embedding_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    assert not unexpected and missing == ["unet.time_embedding.cond_proj.weight"], (missing, unexpected)
    return student


# The paths through which the labels and the guidance scale act: where guidance changes the output.
CONDITIONING = re.compile(r"time_embedding|time_emb_proj|attn2\.|label_embedding|colour_embedding|shape_embedding|"
                          r"null_token|norm")


def freeze_all_but_conditioning(student):
    """Leaves only the conditioning paths' weights to learn (AdamW skips the others and EMA copies them: they stay
    the teacher's, to the bit). Returns how many parameters learn."""
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(bool(CONDITIONING.search(name)))
    return sum(parameter.numel() for parameter in student.parameters() if parameter.requires_grad)


def teacher_timesteps(teacher, steps):
    """The timesteps the teacher's DDIM visits, falling, as the pipeline spaces them."""
    scheduler = sampling_scheduler(teacher.scheduler.config, "ddim")
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def load_data(args, vocabulary):
    data = dataset.load_training_set(synthetic.resolve_data_dir(args.data_dir, args.cache_dir),
                                     cache_dir=args.cache_dir)
    if data.vocabulary.names != vocabulary.names:
        raise UserError(f"{args.teacher} was trained with another label vocabulary ({len(vocabulary.names)} labels) "
                        f"than {args.data_dir} ({len(data.vocabulary.names)} labels)")
    return dataset.with_composite_scenes(data, args.composite_scenes, args.seed, args.composite_pastes,
                                         args.composite_shares)


def check_same_teacher(run_dir, args):
    """A resumed run keeps its teacher: another one would change the targets half-way."""
    config = run_dir / "config.json"
    before = json.loads(config.read_text()).get("teacher") if config.is_file() else None
    if before is not None and Path(before).resolve() != Path(args.teacher).resolve():
        raise UserError(f"{run_dir} distils {before}, not {args.teacher}: pass --teacher {before}, or another --out")


def main(argv=None):
    args = parse_args(argv)
    mixed = args.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if fast_bf16("cuda" if torch.cuda.is_available() else "cpu") else "no"
    AcceleratorState._reset_state(reset_partial_state=True)  # a second main() in one process picks its own
    accelerator = Accelerator(mixed_precision=mixed)
    run_dir = Path(args.out)
    with checkpoints.open_run_dir(run_dir, accelerator.is_main_process, args.resume), StopRequest() as stop:
        return distill(args, accelerator, run_dir, stop)


def distill(args, accelerator, run_dir, stop):
    is_main, device = accelerator.is_main_process, accelerator.device
    check_same_teacher(run_dir, args)
    teacher, sampling = load_teacher(args.teacher, device, args.halve_steps)
    check_guidance_range(sampling, args)
    grid = None
    if args.halve_steps:
        sampling, grid = halved(sampling, args.teacher), teacher_timesteps(teacher, sampling.steps)
    with accelerator.main_process_first():
        data = load_data(args, teacher.unet.vocabulary)
    images = torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device)

    torch.manual_seed(args.seed)
    student = new_student(teacher.unet, args.embedding_dim)
    learning = freeze_all_but_conditioning(student) if args.learn == "conditioning" else count_parameters(student)
    noise_scheduler = teacher.scheduler  # a model folder keeps its training scheduler
    optimizer = make_optimizer(student, args.lr, 0.0)
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.max_steps)
    ema = EMAModel(student.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
    start, train_seconds = 0, 0.0
    with accelerator.main_process_first():
        checkpoint = checkpoints.find_checkpoint(run_dir, args.resume, is_main) if args.resume else None
    if checkpoint:
        start, train_seconds = checkpoints.load_checkpoint(checkpoint, student, ema, optimizer, lr_scheduler)
        if is_main:
            metrics.truncate_metrics(run_dir, start)
            print(f"resumed from {checkpoint} at step {start}", file=sys.stderr)
    ema.to(device)
    student, optimizer = accelerator.prepare(student, optimizer)
    raw_student = accelerator.unwrap_model(student)
    if is_main:
        (run_dir / "config.json").write_text(json.dumps({**vars(args), "parameters": count_parameters(raw_student),
                                                         "learning_parameters": learning,
                                                         "training_images": len(data),
                                                         "precision_used": accelerator.mixed_precision}, indent=1))

    started = time.monotonic()
    images_since_log, seconds_since_log, step = 0, 0.0, start
    progress = TrainingBar(start, args.max_steps, args.max_minutes, disable=not is_main)
    guidance_range = (args.guidance_min, args.guidance_max)
    try:
        while step < args.max_steps:
            tick = time.monotonic()
            generator = step_generator(args.seed, step, accelerator.process_index, device)
            x0, y = training_batch(images, labels, args.batch_size, args.seed, step, accelerator, generator,
                                   raw_student.denoising_size)
            if grid is None:
                loss = distillation_loss(student, teacher.unet, noise_scheduler, x0, y, generator, guidance_range,
                                         accelerator.autocast)
            else:
                loss = halving_loss(student, teacher.unet, noise_scheduler, grid, x0, y, generator, guidance_range,
                                    accelerator.autocast)
            if not optimisation_step(accelerator, student, optimizer, lr_scheduler, ema, loss, args.grad_clip):
                raise NonFiniteLoss.in_step(step + 1, loss, run_dir, advice=" (a lower --lr may help)")
            step += 1
            loss_value = loss.item()
            elapsed = time.monotonic() - tick
            train_seconds, seconds_since_log = train_seconds + elapsed, seconds_since_log + elapsed
            images_since_log += len(x0) * accelerator.num_processes
            out_of_time = args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60
            stop_now = bool(accelerator.gather(torch.tensor([stop.signal is not None or out_of_time],
                                                            device=device)).any())
            if is_main and step % args.log_every == 0:
                metrics.append_metrics(run_dir, {"step": step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                                                 "train_minutes": train_seconds / 60,
                                                 "images_per_s": images_since_log / seconds_since_log})
                progress.postfix.update(loss=f"{loss_value:.5f}", img_s=f"{images_since_log / seconds_since_log:.1f}")
                images_since_log, seconds_since_log = 0, 0.0
            if is_main and (step % args.checkpoint_every == 0 or step == args.max_steps or stop_now):
                checkpoints.save_checkpoint(run_dir, step, train_seconds, raw_student, ema, optimizer, lr_scheduler,
                                            noise_scheduler, args.keep, sampling, teacher.upsampler)
                metrics.plot_curves(run_dir)
            progress.update(step)
            if stop_now:
                break
    except BaseException:
        progress.close(finished=False)
        raise
    return finish_run(stop, progress, accelerator, run_dir, step, args.max_steps, what="student", export=lambda:
                      checkpoints.export_pipeline(raw_student, ema, noise_scheduler, run_dir / "model", sampling,
                                                  teacher.upsampler))


if __name__ == "__main__":
    run_cli(main)
