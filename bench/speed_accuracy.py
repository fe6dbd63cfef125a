"""The trade-off between sampling time and accuracy, one point per setting (sampler x steps), from the measured
numbers in a JSON file (docs/speed_accuracy.json, each point's numbers copied from docs/RESULTS.md):

    python bench/speed_accuracy.py --points docs/speed_accuracy.json --out docs/speed_accuracy.png

{"title": ..., "x_label": ..., "y_label": ..., "points": [{"setting": "ddim 20", "seconds": 40.1, "accuracy": 0.983,
"std": 0.005}, ...], "target": {"seconds": 2, "accuracy": 0.973}} ("target" optional: the issue's bar, drawn as a
shaded corner; a point's optional "label_offset": [dx, dy] in points moves its label off a neighbour's).
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import UserError, read_json, replacing, run_cli  # noqa: E402


def draw(points, path, title, x_label, y_label, target=None):
    fig, axis = plt.subplots(figsize=(6, 4))
    if target:
        axis.axvspan(0, target["seconds"], ymin=0, ymax=1, color="tab:green", alpha=0.08)
        axis.axhline(target["accuracy"], color="tab:green", linestyle="--", linewidth=1,
                     label=f"target: x <= {target['seconds']:g}, within 0.01")
    for i, point in enumerate(points):
        axis.errorbar(point["seconds"], point["accuracy"], yerr=point.get("std", 0), fmt="o", capsize=3)
        axis.annotate(point["setting"], (point["seconds"], point["accuracy"]), textcoords="offset points",
                      xytext=point.get("label_offset", (6, -10 if i % 2 == 0 else 4)),  # neighbours' labels apart
                      fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    if target:
        axis.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with replacing(path) as temp:
        fig.savefig(temp, dpi=100, format="png")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default="docs/speed_accuracy.json", help="the measured points (JSON)")
    p.add_argument("--out", default="docs/speed_accuracy.png", help="the figure to write")
    args = p.parse_args(argv)
    spec = read_json(Path(args.points), "points file")
    points = spec.get("points") if isinstance(spec, dict) else None
    if not points or not all(isinstance(q, dict) and {"setting", "seconds", "accuracy"} <= set(q) for q in points):
        raise UserError(f'{args.points}: expected {{"points": [{{"setting": ..., "seconds": ..., "accuracy": ...}}, '
                        f'...]}}')
    draw(points, Path(args.out), spec.get("title", ""), spec.get("x_label", "seconds per 32-image grid"),
         spec.get("y_label", "accuracy"), spec.get("target"))
    print(f"wrote {args.out} ({len(points)} points)")
    return 0


if __name__ == "__main__":
    run_cli(main)
