"""Seconds to generate the 32-image test grid for each sampler x steps, and that grid's accuracy.

    python bench/sample_speed.py --model runs/cpu/model --conditions data/test.json --evaluator checkpoint.pth

Each configuration is timed end to end through the same pipeline sample.py uses (after one untimed warm-up
call), with --repeats runs; the median is reported. ddpm with 1000 steps is skipped for models above
--ddpm-max-params (it takes minutes per grid on a CPU). With --baseline ddim:20 each timed run is followed by one
of the baseline, and the ratio of the two medians is printed too: this machine's speed drifts, a ratio much less.

    python bench/sample_speed.py --model pretrained/iclevr-tokens --configs ddim:10 dpm++:6 --baseline ddim:20 \
        --guidance-scale 3 --precisions bf16 --repeats 3

A distilled student (distill.py) against its teacher's stored setting: --model runs/student/model --baseline ddim:20
--baseline-model pretrained/iclevr-tokens.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
from cli import run_cli  # noqa: E402
from scoring import score  # noqa: E402
from model import count_parameters, fast_bf16, generate, load_pipeline, pick_device, sampling_scheduler  # noqa: E402
from sampling import PRECISIONS, Guidance, SamplingSettings  # noqa: E402

DEFAULT_CONFIGS = ["ddim:10", "ddim:25", "ddim:50", "dpm++:10", "dpm++:25", "ddpm:1000"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--conditions", default=str(Path(dataset.DEFAULT_DATA_DIR) / "test.json"),
                   help="condition file (default: DATA_DIR/test.json)")
    p.add_argument("--evaluator", help="evaluator checkpoint, to report each grid's accuracy")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="sampler:steps pairs")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    p.add_argument("--guidance-max-t", type=int, help="guide only timesteps below this (default: every step)")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=PRECISIONS,
                   help="the UNet's arithmetic while sampling, each measured in turn (bf16: autocast)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--device", default="auto", help="cpu or cuda")
    p.add_argument("--ddpm-max-params", type=float, default=5e6, help="skip ddpm:1000 above this many parameters")
    p.add_argument("--baseline", metavar="SAMPLER:STEPS",
                   help="also time this setting after each timed run, and print each configuration's time as a "
                        "share of it (default: none)")
    p.add_argument("--baseline-model", metavar="FOLDER",
                   help="draw the --baseline setting with this model folder, e.g. a student's teacher (default: "
                        "--model)")
    args = p.parse_args()
    if args.baseline_model and not args.baseline:
        p.error("--baseline-model needs --baseline (the setting to draw with it)")
    baseline_sampler, baseline_steps = args.baseline.split(":") if args.baseline else (None, None)

    pipe = load_pipeline(args.model, pick_device(args.device))
    baseline_pipe = load_pipeline(args.baseline_model, pipe.device) if args.baseline_model else pipe
    train_config = pipe.scheduler.config  # every sampler is built from the training schedule
    labels = dataset.load_conditions(args.conditions, pipe.unet.vocabulary)
    vocabulary = dataset.find_vocabulary()
    evaluator = None
    if args.evaluator:
        from evaluator import evaluation_model
        evaluator = evaluation_model(args.evaluator, device=None if args.device == "auto" else args.device)
    params = count_parameters(pipe.unet)
    print(f"model {args.model} ({params / 1e6:.2f}M parameters), {len(labels)} images, "
          f"{Guidance(args.guidance_scale, args.guidance_max_t).describe()}, device {pipe.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'sampler':<8s} {'steps':>6s} {'precision':>9s} {'seconds':>8s} {'accuracy':>9s}" +
          (f" {'x ' + args.baseline:>14s}" if args.baseline else ""))

    def timed(settings, drawing=pipe):
        drawing.scheduler = sampling_scheduler(train_config, settings.sampler)
        start = time.perf_counter()
        images = generate(drawing, labels, settings, args.seed)
        return time.perf_counter() - start, images

    for config, precision in [(c, p) for c in args.configs for p in args.precisions]:
        sampler, steps = config.split(":")
        steps = int(steps)
        if sampler == "ddpm" and steps >= 1000 and params > args.ddpm_max_params:
            print(f"{sampler:<8s} {steps:>6d} {precision:>9s} {'skipped':>8s}")
            continue
        if precision == "bf16" and not fast_bf16(pipe.device.type):
            # emulated bf16 is no setting anyone samples with (sample.py falls back to fp32): measured 197 s a
            # DDIM step of a 32-image grid on an AVX2-only CPU, where fp32 takes 4.6 s
            print(f"{sampler:<8s} {steps:>6d} {precision:>9s} {'skipped':>8s} (no fast bf16 here: AMX-BF16, "
                  "AVX512-BF16 or a GPU)")
            continue
        settings = SamplingSettings(sampler, steps, args.guidance_scale, args.guidance_max_t, precision=precision)
        baseline = settings.replace(sampler=baseline_sampler, steps=int(baseline_steps)) if args.baseline else None
        pipe.scheduler = sampling_scheduler(train_config, sampler)
        generate(pipe, labels[:1], settings.replace(steps=1), args.seed)  # warm-up
        if baseline_pipe is not pipe:
            timed(baseline.replace(steps=1), baseline_pipe)
        times, baseline_times, images = [], [], None
        for _ in range(args.repeats):
            seconds, images = timed(settings)
            times.append(seconds)
            if baseline:
                baseline_times.append(timed(baseline, baseline_pipe)[0])
        accuracy = f"{score(evaluator, images, labels, vocabulary)['accuracy']:.4f}" if evaluator else "-"
        ratio = (f" {statistics.median(times) / statistics.median(baseline_times):>14.3f}" if baseline else "")
        print(f"{sampler:<8s} {steps:>6d} {precision:>9s} {statistics.median(times):>8.2f} {accuracy:>9s}{ratio}",
              flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
