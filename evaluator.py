"""The ResNet18 evaluator in the course's format, and how to train one.

`evaluation_model` has the course's interface: it loads `checkpoint.pth` (torchvision ResNet18 with
`fc = Sequential(Linear(512, 24), Sigmoid)`, state dict under 'model'), takes images 64x64 in [-1, 1] and
`eval(images, labels)` returns the pooled top-k accuracy. The course's own checkpoint drops in unchanged.

    python evaluator.py train --data-dir data --out checkpoint.pth      # held-out scenes, ~98-99%
    python evaluator.py test --checkpoint checkpoint.pth --data-dir data  # clean / blurred / noisy accuracy
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import models
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

import dataset
import synthetic
from cli import UserError, replacing, run_cli

NUM_LABELS = 24
DEFAULT_CHECKPOINT = os.environ.get("ICLEVR_EVALUATOR", "checkpoint.pth")
HOW_TO_GET = ("put the course's checkpoint.pth there, or train one: python evaluator.py train --data-dir data "
              "--out checkpoint.pth")


def resnet18_classifier():
    """The course's architecture: ResNet18 with a 24-way sigmoid head."""
    net = models.resnet18(weights=None)
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, NUM_LABELS), torch.nn.Sigmoid())
    return net


def features(net, images):
    """The 512-d penultimate activations (for the Fréchet distance)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


def logits(net, images):
    return net.fc[0](features(net, images))


def topk_choices(scores, onehot):
    """Per image with k requested labels, the indices of its k highest scores: what the evaluator reads in it.
    Ties are broken towards the lower label index (a stable sort), so the result is deterministic."""
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return [row[:int(k)].tolist() for row, k in zip(order, onehot.sum(1).tolist())]


def topk_hits(scores, onehot):
    """Per image with k requested labels: how many of the k highest scores are requested labels.
    Returns (hits, k) summed over the batch: pool them over a file, then divide."""
    chosen = topk_choices(scores, onehot)
    hits = sum(int(labels[row].sum().item()) for row, labels in zip(chosen, onehot))
    return hits, int(onehot.sum().item())


def pooled_accuracy(scores, onehot):
    hits, total = topk_hits(scores, onehot)
    return hits / total


class evaluation_model:  # noqa: N801 -- the course's name
    """The course's evaluator interface, on CPU or GPU."""

    def __init__(self, checkpoint=DEFAULT_CHECKPOINT, device=None):
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise UserError(f"evaluator checkpoint {checkpoint} not found: {HOW_TO_GET}")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.resnet18 = resnet18_classifier()
            self.resnet18.load_state_dict(state["model"])
        except Exception as error:  # pickle, key and shape errors all mean "not a course-format checkpoint"
            raise UserError(f"{checkpoint}: not a course-format evaluator checkpoint "
                            f"({str(error).splitlines()[0][:120]})")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.resnet18 = self.resnet18.to(self.device).eval()
        self.classnum = NUM_LABELS
        self.checkpoint = checkpoint
        self.label_names = state.get("label_names")  # checkpoints trained here name their label order

    def check_label_order(self, vocabulary, whose):
        """Refuse to score labels encoded in another order than the evaluator's (when its checkpoint says)."""
        if self.label_names is not None and list(self.label_names) != vocabulary.names:
            first = next((i for i, (a, b) in enumerate(zip(self.label_names, vocabulary.names)) if a != b),
                         min(len(self.label_names), len(vocabulary.names)))
            theirs = self.label_names[first] if first < len(self.label_names) else "none"
            ours = vocabulary.names[first] if first < len(vocabulary.names) else "none"
            raise UserError(f"{self.checkpoint} orders its labels differently from {whose} (label {first}: "
                            f"{theirs!r} there, {ours!r} here): use an evaluator trained with the same objects.json")

    def compute_acc(self, out, onehot_labels):
        return pooled_accuracy(out, onehot_labels)

    # Always float32, also inside a caller's autocast: in bf16 every logit above ~7 rounds to a sigmoid of exactly
    # 1.0, and top-k would then pick among tied labels by index instead of by confidence.
    @torch.no_grad()
    def predict(self, images):
        with torch.autocast(self.device.type, enabled=False):
            return self.resnet18(images.to(self.device, torch.float32)).cpu()

    @torch.no_grad()
    def features(self, images):
        with torch.autocast(self.device.type, enabled=False):
            return features(self.resnet18, images.to(self.device, torch.float32)).cpu()

    def eval(self, images, labels):
        return self.compute_acc(self.predict(images), labels.cpu())


# ---------------------------------------------------------------------------------------------------------
# Training


def augment(x, generator):
    """Mirror, shift by up to 4 pixels, and sometimes add a little noise: the evaluator must not depend on
    position or on the clean texture of real renders (generated images are noisier)."""
    batch = len(x)
    flip = torch.rand(batch, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    x = padded[:, :, dy:dy + 64, dx:dx + 64]
    noisy = torch.rand(batch, 1, 1, 1, generator=generator) < 0.5
    sigma = torch.rand(batch, 1, 1, 1, generator=generator) * 0.08 * noisy
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


@torch.no_grad()
def score_images(net, images_uint8, labels, batch_size=256, transform=None):
    """Pooled accuracy and per-label accuracy of `net` on uint8 images."""
    net.eval()
    scores = []
    for start in range(0, len(images_uint8), batch_size):
        x = dataset.to_model_input(torch.from_numpy(images_uint8[start:start + batch_size]))
        scores.append(net(transform(x) if transform else x))
    scores, labels = torch.cat(scores), torch.from_numpy(labels)
    chosen = torch.zeros_like(labels)
    for i, row in enumerate(topk_choices(scores, labels)):
        chosen[i, row] = 1
    per_label = (chosen * labels).sum(0) / labels.sum(0).clamp(min=1)
    return pooled_accuracy(scores, labels), per_label.numpy()


def save_checkpoint(net, path, extra):
    """Course format ('model': state dict) plus provenance; written to a temporary file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temp:
        torch.save({"model": net.state_dict(), **extra}, temp)


def train(args):
    data = dataset.load_training_set(synthetic.resolve_data_dir(args.data_dir, args.cache_dir),
                                     cache_dir=args.cache_dir)
    train_index, held_index = dataset.split_by_scene(data.filenames, args.held_out, args.seed)
    if args.limit:
        train_index = train_index[:args.limit]
    if len(held_index) == 0 or len(train_index) < args.batch_size:
        raise UserError(f"too few images for training ({len(train_index)}) or held out ({len(held_index)})")
    train_set, held_set = data.subset(train_index), data.subset(held_index)
    print(f"{len(train_set)} training images, {len(held_set)} held out ({args.held_out:.0%} of scenes)")

    torch.manual_seed(args.seed)
    net = resnet18_classifier()
    images, labels = torch.from_numpy(train_set.images), torch.from_numpy(train_set.labels)
    steps_per_epoch = len(train_set) // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.monotonic()
    net.train()
    with tqdm(range(total), desc="training evaluator", unit="step") as progress:
        for step in progress:
            index = dataset.batch_indices(len(train_set), args.batch_size, args.seed, step)
            x = augment(dataset.to_model_input(images[index]), generator)
            loss = F.binary_cross_entropy_with_logits(logits(net, x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
            if args.max_minutes and time.monotonic() - started > args.max_minutes * 60:
                print(f"stopped after --max-minutes at step {step + 1} of {total}")
                break
    minutes = (time.monotonic() - started) / 60
    accuracy, per_label = score_images(net, held_set.images, held_set.labels)
    print_per_label(data.vocabulary, per_label)
    print(f"held-out pooled accuracy: {accuracy:.4f} ({len(held_set)} images, {minutes:.1f} min of training)")
    save_checkpoint(net, args.out, {"label_names": data.vocabulary.names, "held_out_accuracy": accuracy,
                                    "held_out_fraction": args.held_out, "split_seed": args.seed,
                                    "training_minutes": minutes})
    print(f"saved {args.out}")
    return 0


def print_per_label(vocabulary, per_label):
    for start in range(0, len(per_label), 8):
        print("  ".join(f"{name:>16s} {per_label[i]:.3f}" for i, name in
                        enumerate(vocabulary.names[start:start + 8], start)))


def test(args):
    """Held-out accuracy on clean images and under blur and noise (robustness of the evaluator)."""
    model = evaluation_model(args.checkpoint, device=args.device)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    fraction, seed = state.get("held_out_fraction", args.held_out), state.get("split_seed", args.seed)
    data = dataset.load_training_set(synthetic.resolve_data_dir(args.data_dir, args.cache_dir),
                                     cache_dir=args.cache_dir)
    held = data.subset(dataset.split_by_scene(data.filenames, fraction, seed)[1])
    generator = torch.Generator().manual_seed(0)
    conditions = {
        "clean": None,
        "blur sigma 0.8": lambda x: gaussian_blur(x, 5, 0.8),
        "blur sigma 1.2": lambda x: gaussian_blur(x, 5, 1.2),
        "noise sigma 0.05": lambda x: (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(-1, 1),
        "noise sigma 0.10": lambda x: (x + 0.10 * torch.randn(x.shape, generator=generator)).clamp(-1, 1),
    }
    results = {}
    print(f"{len(held)} held-out images ({fraction:.0%} of scenes, split seed {seed})")
    for name, transform in conditions.items():
        results[name], _ = score_images(model.resnet18, held.images, held.labels, transform=transform)
        print(f"{name:>18s}: {results[name]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR,
                        help=f"course data folder, or '{dataset.SYNTHETIC}' for generated scenes")
    common.add_argument("--cache-dir", default=str(dataset.DEFAULT_CACHE_DIR), help="decoded-image cache")
    common.add_argument("--held-out", type=float, default=0.1, help="fraction of scenes held out (whole triples)")
    common.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches")

    t = commands.add_parser("train", parents=[common], help="train a course-format checkpoint")
    t.add_argument("--out", default="checkpoint.pth", help="where to write the checkpoint")
    t.add_argument("--epochs", type=float, default=15, help="passes over the training images")
    t.add_argument("--batch-size", type=int, default=128, help="images per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (one-cycle schedule)")
    t.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    t.add_argument("--limit", type=int, help="train on only the first N training images (quick checks)")
    t.add_argument("--max-minutes", type=float, help="stop training after so many minutes, then evaluate and save")

    e = commands.add_parser("test", parents=[common], help="held-out accuracy, clean and under blur/noise")
    e.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="evaluator checkpoint")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not 0 < args.held_out < 1:
        p.error("--held-out must be between 0 and 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    return train(args) if args.command == "train" else test(args)


if __name__ == "__main__":
    run_cli(main)
