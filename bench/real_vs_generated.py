"""Real i-CLEVR scenes beside generated ones for the same labels: the figure docs/real_vs_generated.png.

    python bench/real_vs_generated.py --model pretrained/iclevr-tokens --data-dir ../shared/data

Top row: real training images of 2 and 3 objects, drawn at random (the same on every machine); bottom row: the
model folder's images for the same labels, with its stored sampling settings and one seed; the labels beneath
each column.
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset  # noqa: E402
from cli import UserError, replacing, run_cli  # noqa: E402
from model import generate, prepare_pipeline  # noqa: E402

def real_scenes(data, count, seed):
    """`count` images of 2 objects or more, at random but the same on every machine."""
    pool = [i for i, labels in enumerate(data.label_lists) if len(labels) >= 2]
    if len(pool) < count:
        raise UserError(f"only {len(pool)} images of 2 objects or more in this data; ask for fewer (--count)")
    return sorted(np.random.default_rng(seed).choice(pool, size=count, replace=False))


def draw_figure(real, generated, label_lists, path):
    columns = len(real)
    figure, axes = plt.subplots(2, columns, figsize=(1.45 * columns, 3.5))
    for column in range(columns):
        for row, images in enumerate((real, generated)):
            axes[row, column].imshow(images[column])
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[1, column].set_xlabel("\n".join(label_lists[column]), fontsize=7)
    axes[0, 0].set_ylabel("real", fontsize=9)
    axes[1, 0].set_ylabel("generated", fontsize=9)
    figure.tight_layout()
    with replacing(path) as temp:
        figure.savefig(temp, format="png", dpi=110)
    plt.close(figure)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained/iclevr-tokens", help="model folder (its sampling.json applies)")
    p.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR, help="course data folder (the real scenes)")
    p.add_argument("--count", type=int, default=8, help="columns: scenes shown")
    p.add_argument("--seed", type=int, default=0, help="picks the scenes and the sampling noise")
    p.add_argument("--out", default="docs/real_vs_generated.png", help="the figure to write")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be at least 1")
    data = dataset.load_training_set(args.data_dir)
    chosen = real_scenes(data, args.count, args.seed)
    label_lists = [data.label_lists[i] for i in chosen]
    pipe, settings = prepare_pipeline(args.model)
    generated = generate(pipe, label_lists, settings, args.seed)
    draw_figure(data.images[chosen], generated, label_lists, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
