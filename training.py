"""One training step of the DDPM, as train.py runs it: the batch, the loss, the optimisation step with its
schedule and EMA (bench/ times exactly these), and the parsing of --model-option.
"""
import json

import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import compute_snr

import dataset
from model import prediction_target, to_sample_size


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
