"""Training throughput per preset: train.py's step against a plain baseline, in fp32 and bf16, in the same run.

    python bench/train_throughput.py                       # tiny, small, cpu and tokens on this machine
    python bench/train_throughput.py --presets small --batch-size 64 --compile

"ours" is exactly what train.py runs per step (batch from the preloaded uint8 tensor, random mirror, label
dropout, loss, backward, gradient clipping, AdamW, LR schedule, EMA), with train.py's speed options, in fp32;
"ours bf16" the same step under bf16 autocast (train.py --mixed-precision bf16), measured alternately with it.
"plain" is the textbook step on the same UNet and batch: add_noise + MSE + AdamW in fp32, nothing else.
All start from the same weights; the first losses of "ours" and "plain" on the same batch and noise are compared.
The first line says whether this CPU has fast bf16 (AMX-BF16 or AVX512-BF16), without which bf16 is emulated and
slower than fp32.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
from cli import replacing  # noqa: E402
import training  # noqa: E402
from model import build_model, count_parameters, fast_bf16, to_sample_size, training_scheduler  # noqa: E402


def plain_step(model, optimizer, scheduler, x0, labels, generator):
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (len(x0),), generator=generator)
    loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, labels), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def timed(step, warmup, repeats, steps_per_repeat, batch):
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps_per_repeat):
            step()
        rates.append(batch * steps_per_repeat / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(preset, args, names, images_uint8, labels):
    torch.manual_seed(0)
    reference = build_model(preset, names, **args.model_options)
    scheduler = training_scheduler()
    accelerator = Accelerator(cpu=True)

    # the same first batch and noise for both: compare the numbers before timing anything
    size = reference.denoising_size
    x0 = to_sample_size(dataset.to_model_input(images_uint8[:args.batch_size]), size)
    y = labels[:args.batch_size]
    ours_model = training.prepare_model(copy.deepcopy(reference), args.compile)
    with torch.no_grad():
        ours_loss = training.training_loss(ours_model, scheduler, x0, y, torch.Generator().manual_seed(1), 0.0)
        plain_loss = plain_step_loss(reference, scheduler, x0, y, torch.Generator().manual_seed(1))
    mismatch = abs(ours_loss.item() - plain_loss.item()) / plain_loss.item()

    plain_model = copy.deepcopy(reference)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    plain = timed(lambda: plain_step(plain_model, plain_optimizer, scheduler, x0, y, generator),
                  args.warmup, args.repeats, args.steps, args.batch_size)

    optimizer = training.make_optimizer(ours_model, lr=1e-4, weight_decay=0.0)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, 10, 10**6)
    ema = EMAModel(ours_model.parameters(), decay=0.9999, use_ema_warmup=True, power=2 / 3, foreach=True)
    ours_model, optimizer = accelerator.prepare(ours_model, optimizer)
    state = {"step": 0}

    def our_step():
        generator = training.step_generator(0, state["step"], 0, "cpu")
        batch, batch_labels = training.training_batch(images_uint8, labels, args.batch_size, 0, state["step"],
                                                   accelerator, generator, size)
        loss = training.training_loss(ours_model, scheduler, batch, batch_labels, generator, 0.1)
        training.optimisation_step(accelerator, ours_model, optimizer, lr_scheduler, ema, loss, 1.0)
        state["step"] += 1

    def our_bf16_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            our_step()

    ours, ours_bf16 = [], []
    for _ in range(args.repeats):  # alternating, so that a change of machine speed hits both alike
        ours.append(timed(our_step, args.warmup, 1, args.steps, args.batch_size))
        ours_bf16.append(timed(our_bf16_step, args.warmup, 1, args.steps, args.batch_size))
    return count_parameters(reference), plain, statistics.median(ours), statistics.median(ours_bf16), mismatch


def plain_step_loss(model, scheduler, x0, labels, generator):
    """The baseline's loss with the noise and timesteps training.training_loss draws from the same generator."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (len(x0),), generator=generator)
    torch.rand(len(x0), generator=generator)  # train.py draws its label-dropout mask here
    return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t, labels), noise)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "cpu", "tokens", "tokens-wide"],
                   help="presets to measure")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each (the median is reported)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field of every preset, as train.py's --model-option (e.g. "
                        "block_out_channels=[96,192,384])")
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--compile", action="store_true", help="train.py --compile for 'ours'")
    p.add_argument("--json", help="also write the unrounded numbers of every row to this file")
    args = p.parse_args()
    args.model_options = dict(training.parse_model_option(p, text) for text in args.model_option)
    names = dataset.Vocabulary.load(dataset.DEFAULT_VOCABULARY).names
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(256, args.batch_size), 64, 64, 3), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(len(images), 24, generator=generator) < 0.08).float()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"compile {'on' if args.compile else 'off'}, fast bf16 {'yes' if fast_bf16('cpu') else 'no'}")
    print(f"{'preset':<11s} {'params':>8s} {'plain img/s':>12s} {'ours img/s':>11s} {'ratio':>6s} {'loss diff':>10s} "
          f"{'ours bf16':>10s} {'bf16 gain':>10s}")
    rows = []
    for preset in args.presets:
        params, plain, ours, ours_bf16, mismatch = measure(preset, args, names, images, labels)
        rows.append(dict(preset=preset, parameters=params, plain=plain, ours=ours, ratio=ours / plain,
                         loss_diff=mismatch, ours_bf16=ours_bf16, bf16_gain=ours_bf16 / ours))
        print(f"{preset:<11s} {params / 1e6:>7.2f}M {plain:>12.1f} {ours:>11.1f} {ours / plain:>6.2f} "
              f"{mismatch:>10.1e} {ours_bf16:>10.1f} {ours_bf16 / ours:>10.2f}", flush=True)
    if args.json:
        with replacing(args.json) as temp:
            temp.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
