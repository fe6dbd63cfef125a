"""Compare training runs at equal training time, or at equal numbers of training images: the last evaluation
at or before each budget.

    python bench/recipe_table.py runs/cpu-a runs/cpu-b --minutes 15 30 60 --key acc_random-96-1
    python bench/recipe_table.py runs/a runs/b --kimages 20 40 80       # thousands of images seen
    python bench/recipe_table.py runs/cpu --plot docs/cpu_recipe_curve.png

Reads each run's metrics.jsonl (written by train.py --eval-every / --eval-every-minutes); the time axis is
training wall time (evaluation and checkpoint time excluded). Images seen are steps x images per step (from
config.json): the axis to compare runs of one architecture whose wall time was shared with other work. A run
that stopped before a budget shows "-".
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics import read_metrics  # noqa: E402  (skips the half-written last line of a killed run)


def at_budget(records, key, budget, axis="train_minutes"):
    """The last evaluation at or before `budget` on `axis`; None when the run stopped before it (5% slack)."""
    if not records or records[-1][axis] < 0.95 * budget:
        return None
    before = [r for r in records if key in r and r[axis] <= budget + 1e-9]
    return before[-1][key] if before else None


def with_kimages(run, records):
    """Add "kimages" (thousands of training images seen) to every record of the run folder `run`."""
    config = json.loads((Path(run) / "config.json").read_text())
    per_step = config.get("images_per_step", config["batch_size"])  # runs older than the key: one process
    return [{**r, "kimages": r["step"] * per_step / 1000} for r in records]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--minutes", nargs="+", type=float, default=[15, 30, 60, 120], help="time budgets")
    p.add_argument("--kimages", nargs="+", type=float,
                   help="budgets in thousands of training images instead of minutes (needs config.json)")
    p.add_argument("--key", help="metric to tabulate (default: every acc_* found)")
    p.add_argument("--plot", help="also draw accuracy vs training minutes of every run into this PNG")
    args = p.parse_args()
    runs = {run: read_metrics(Path(run)) for run in args.runs}
    axis, budgets, unit = "train_minutes", args.minutes, "training minutes"
    if args.kimages:
        runs = {run: with_kimages(run, records) for run, records in runs.items()}
        axis, budgets, unit = "kimages", args.kimages, "thousands of training images"
    keys = [args.key] if args.key else sorted({k for records in runs.values() for r in records for k in r
                                               if k.startswith("acc_")})
    for key in keys:
        print(f"{key} at {unit}")
        print(f"{'run':<40s}" + "".join(f" {m:>6g}" for m in budgets))
        for run, records in runs.items():
            cells = [at_budget(records, key, m, axis) for m in budgets]
            print(f"{Path(run).name:<40s}" + "".join(f" {c:>6.3f}" if c is not None else f" {'-':>6s}" for c in cells))
        print()
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run, records in runs.items():
            for key in keys:
                points = [r for r in records if key in r]
                label = f"{Path(run).name} {key[4:]}" if len(runs) > 1 else key[4:]
                ax.plot([r[axis] for r in points], [r[key] for r in points], marker="o", label=label)
        ax.set(xlabel=unit, ylabel="evaluator accuracy", ylim=(0, 1))
        ax.axhline(0.8, color="gray", linestyle=":")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
