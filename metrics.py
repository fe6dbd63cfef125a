"""What a training run records: metrics.jsonl (one JSON line per record), curves.png, and the conditioning meter
that says whether the model uses its labels at all.
"""
import json

import torch

import dataset
from cli import replacing
from model import prediction_target, to_sample_size

SHARE_PREFIX = "meter_share_t"  # metrics.jsonl keys of the meter's per-band shares: meter_share_t0, ...


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
    with replacing(run_dir / "metrics.jsonl") as temp:
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
            bicubic = any(r.get("eval_upsampling") == "bicubic" for r in points)
            accuracy_axis.plot([r["train_minutes"] for r in points], [r[key] for r in points], marker="o",
                               label=key[4:] + (" (bicubic upsampling)" if bicubic else ""))
        accuracy_axis.set(xlabel="training minutes", ylabel="evaluator accuracy", ylim=(0, 1), title="accuracy")
        accuracy_axis.legend()
    fig.tight_layout()
    with replacing(run_dir / "curves.png") as temp:
        fig.savefig(temp, dpi=90)
    plt.close(fig)



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
        self.target = prediction_target(noise_scheduler, x0, noise, t)
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
