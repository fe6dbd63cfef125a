"""One training step of the DDPM, as train.py runs it: the batch, the loss, the optimisation step with its
schedule and EMA (bench/ times exactly these), distill.py's loss, the parsing of --model-option, and what both
training scripts share around their loop: the stop request, the progress bar and the run's ending.
"""
import json
import signal
import sys
import time

import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

import checkpoints
import dataset
from cli import UserError
from model import prediction_target, to_sample_size

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class NonFiniteLoss(UserError):
    """A loss or gradient that is not finite stops a training script with exit code 3."""
    exit_code = 3

    @classmethod
    def in_step(cls, step, loss, run_dir, advice=""):
        """The error for `step` (counted from 1), naming the checkpoint a resumed run would start from."""
        last = checkpoints.checkpoint_dirs(run_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        return cls(f"non-finite loss ({loss.item()}) in step {step}; stopped without saving: {where}{advice}")


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
    target = prediction_target(noise_scheduler, x0, noise, t)
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
        epsilon = noise_scheduler.config.prediction_type == "epsilon"
        per_image = per_image * snr.clamp(max=snr_gamma) / (snr if epsilon else snr + 1)
    return per_image.mean()


def guided_target(teacher, noisy, t, labels, scales, autocast):
    """The teacher's guided output at scale w, one per sample (no gradient): a distilled student's one pass, or
    an ordinary model's two, out_uncond + w * (out_cond - out_uncond), the pipeline's guidance arithmetic."""
    with torch.no_grad(), autocast():
        if teacher.distilled:
            return teacher(noisy, t, labels, guidance_scale=scales).float()
        both = teacher(torch.cat([noisy, noisy]), torch.cat([t, t]),
                       torch.cat([labels, torch.zeros_like(labels)])).float()
    conditional, unconditional = both.chunk(2)
    return unconditional + scales[:, None, None, None] * (conditional - unconditional)


def guidance_scales(batch, guidance_range, generator, device):
    low, high = guidance_range
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


def distillation_loss(student, teacher, noise_scheduler, x0, labels, generator, guidance_range, autocast):
    """Guidance distillation (Meng et al. 2023, its first stage): at a training image noised to a random timestep
    and a scale w drawn uniformly from `guidance_range`, the MSE between the student's one pass and its teacher's
    guided output. `autocast`: the context the teacher runs in (the accelerator's, as the student's)."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = training_timesteps(batch, noise_scheduler.config.num_train_timesteps, generator, x0.device)
    scales = guidance_scales(batch, guidance_range, generator, x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    target = guided_target(teacher, noisy, t, labels, scales, autocast)
    return F.mse_loss(student(noisy, t, labels, guidance_scale=scales).float(), target)


def signal_and_noise(noise_scheduler, t):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped for images; t = -1 is the clean image (DDIM's last
    step, set_alpha_to_one)."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(t.device)[t.clamp(min=0)]
    alpha_bar = torch.where(t >= 0, alpha_bar, torch.ones_like(alpha_bar))[:, None, None, None]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def ddim_step(noise_scheduler, x, output, t, t_next):
    """One deterministic DDIM step from t to t_next, per sample, as the pipeline's DDIM takes it: the clean
    estimate clipped to the image range, the noise estimate not."""
    signal, noise = signal_and_noise(noise_scheduler, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        clean, epsilon = signal * x - noise * output, signal * output + noise * x
    else:
        clean, epsilon = (x - noise * output) / signal, output
    next_signal, next_noise = signal_and_noise(noise_scheduler, t_next)
    return next_signal * clean.clamp(-1, 1) + next_noise * epsilon


def one_step_target(noise_scheduler, x, x_next, t, t_next):
    """The output at t whose DDIM step lands on x_next at t_next (Salimans & Ho 2022, the distillation target):
    the clean image x~ with x_next = a' x~ + s' (x - a x~) / s, as v or epsilon."""
    signal, noise = signal_and_noise(noise_scheduler, t)
    next_signal, next_noise = signal_and_noise(noise_scheduler, t_next)
    ratio = next_noise / noise
    clean = (x_next - ratio * x) / (next_signal - ratio * signal)
    epsilon = (x - signal * clean) / noise
    if noise_scheduler.config.prediction_type == "v_prediction":
        return signal * epsilon - noise * clean
    return epsilon


def halving_loss(student, teacher, noise_scheduler, grid, x0, labels, generator, guidance_range, autocast):
    """Progressive distillation (Salimans & Ho 2022; with a guidance input, Meng et al. 2023's second stage): the
    student learns to take in one DDIM step two of its teacher's. `grid`: the teacher's DDIM timesteps, falling
    (an even count); the student's are every second one. A training image is noised to one of those, the teacher
    takes its two guided steps at a scale w from `guidance_range`, and the student's one pass is taught the output
    whose DDIM step lands where they did."""
    batch = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    grid = torch.tensor([*grid, -1], device=x0.device)
    start = 2 * torch.randint(0, (len(grid) - 1) // 2, (batch,), generator=generator, device=x0.device)
    t, t_middle, t_end = grid[start], grid[start + 1], grid[start + 2]
    scales = guidance_scales(batch, guidance_range, generator, x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    middle = ddim_step(noise_scheduler, noisy, guided_target(teacher, noisy, t, labels, scales, autocast), t,
                       t_middle)
    end = ddim_step(noise_scheduler, middle, guided_target(teacher, middle, t_middle, labels, scales, autocast),
                    t_middle, t_end)
    target = one_step_target(noise_scheduler, noisy, end, t, t_end)
    return F.mse_loss(student(noisy, t, labels, guidance_scale=scales).float(), target)


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


def parse_model_option(parser, text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--model-option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


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


class TrainingBar:
    """The training progress bar, whose total and remaining time follow whichever limit ends the run first: with
    only a step limit it counts steps; with --max-minutes it counts wall-clock seconds (the step and images/s
    beside them) up to the time limit, or up to when the steps at the pace so far will end, if sooner. `clock`
    is time.monotonic, or a stand-in for tests."""

    def __init__(self, start, steps, max_minutes=None, clock=time.monotonic, disable=False, **tqdm_options):
        self.start, self.steps, self.clock, self.began = start, steps, clock, clock()
        self.limit = None if max_minutes is None else max_minutes * 60
        self.postfix = {}
        if self.limit is None:
            self.bar = tqdm(total=steps, initial=start, desc="training", unit="step", disable=disable, **tqdm_options)
        else:
            self.bar = tqdm(total=self.limit, desc="training", unit="s", disable=disable, **tqdm_options,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")

    def update(self, step, **postfix):
        self.postfix.update(postfix)
        if self.limit is None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(self.postfix, refresh=False)
            return
        elapsed, done = self.clock() - self.began, step - self.start
        by_steps = elapsed / done * (self.steps - self.start) if done else float("inf")
        self.bar.total = min(self.limit, by_steps)
        self.bar.n = min(elapsed, self.bar.total)
        self.bar.set_postfix({"step": f"{step}/{self.steps}", **self.postfix})

    def close(self, finished=True):
        """`finished`: the run reached its limit (the bar shows 100%), rather than being interrupted."""
        if finished and self.limit is not None:
            self.bar.n = self.bar.total
            self.bar.refresh()
        self.bar.close()


def finish_run(stop, progress, accelerator, run_dir, step, steps, export, what):
    """After a training loop (train.py, distill.py): on SIGINT/SIGTERM say how to resume and return its exit code;
    otherwise let the main process export model/ (`export()`) and return 0. `what`: the exported thing's name."""
    progress.close(finished=stop.signal is None)
    accelerator.wait_for_everyone()
    if stop.signal is not None:
        print(f"interrupted by {stop.signal.name} at step {step}: checkpoint saved in {run_dir}/checkpoints; "
              f"continue with --resume latest", file=sys.stderr)
        return EXIT_INTERRUPTED[stop.signal]
    if accelerator.is_main_process:
        export()
        print(f"{'stopped after --max-minutes' if step < steps else 'done'} at step {step}: "
              f"{what} exported to {run_dir / 'model'}", file=sys.stderr)
    return 0
