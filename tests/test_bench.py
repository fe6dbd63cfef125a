import json
import re

from conftest import run_script


def test_train_throughput_compares_against_the_plain_step_with_the_same_numbers(tmp_path):
    result = run_script("bench/train_throughput.py", "--presets", "tiny", "tiny-tokens", "--batch-size", 4,
                        "--warmup", 1, "--repeats", 1, "--steps", 2, "--json", tmp_path / "rows.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["preset"] for r in rows] == ["tiny", "tiny-tokens"]
    assert re.search(r"AMX-BF16 (yes|no)$", result.stdout.splitlines()[0])
    for r in rows:
        # the table shows what the file holds, rounded; the ratio is computed from the unrounded numbers
        printed = re.search(rf"^{r['preset']}\s+([\d.]+)M\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)"
                            rf"\s+([\d.]+)\s+([\d.]+)$", result.stdout, re.M)
        assert printed, result.stdout
        assert printed.groups()[1:4] == (f"{r['plain']:.1f}", f"{r['ours']:.1f}", f"{r['ratio']:.2f}")
        assert printed.groups()[5:] == (f"{r['ours_bf16']:.1f}", f"{r['bf16_gain']:.2f}")
        assert r["plain"] > 0 and r["ours"] > 0 and r["ratio"] == r["ours"] / r["plain"]
        assert r["ours_bf16"] > 0 and r["bf16_gain"] == r["ours_bf16"] / r["ours"]
        assert r["loss_diff"] < 1e-5  # our step computes the same loss as the textbook one on the same batch and noise


def test_recipe_table_compares_runs_at_equal_training_time(tmp_path):
    import json

    def run(name, records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp_path / name

    long = run("long", [{"step": 10, "train_minutes": 9, "acc_test": 0.2}, {"step": 20, "train_minutes": 19,
                                                                            "acc_test": 0.4},
                        {"step": 30, "train_minutes": 30, "loss": 0.1}])
    short = run("short", [{"step": 10, "train_minutes": 11, "acc_test": 0.3}])
    result = run_script("bench/recipe_table.py", long, short, "--minutes", 5, 10, 20, 30, "--key", "acc_test")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:4]}
    assert rows["long"] == ["-", "0.200", "0.400", "0.400"]  # the last evaluation at or before each budget
    assert rows["short"] == ["-", "-", "-", "-"]  # stopped at 11 minutes: no claim about 20 or 30; none before 11


def test_recipe_table_compares_runs_at_equal_numbers_of_images(tmp_path):
    """--kimages: steps x images per step from config.json; a run of bigger batches reaches a budget sooner."""
    def run(name, images_per_step, records):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / name / "config.json").write_text(json.dumps({"batch_size": 1, "images_per_step": images_per_step}))
        return tmp_path / name

    small = run("small", 32, [{"step": 500, "train_minutes": 30, "acc_test": 0.2},
                              {"step": 1000, "train_minutes": 60, "acc_test": 0.3}])
    big = run("big", 64, [{"step": 500, "train_minutes": 50, "acc_test": 0.35}])
    result = run_script("bench/recipe_table.py", small, big, "--kimages", 16, 32, "--key", "acc_test")
    assert result.returncode == 0, result.stderr
    assert "acc_test at thousands of training images" in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:4]}
    assert rows["small"] == ["0.200", "0.300"] and rows["big"] == ["-", "0.350"]
