import json
import re

import pytest

from conftest import run_script


def test_train_throughput_compares_against_the_plain_step_with_the_same_numbers(tmp_path):
    result = run_script("bench/train_throughput.py", "--presets", "tiny", "tiny-tokens", "--batch-size", 4,
                        "--warmup", 1, "--repeats", 1, "--steps", 2, "--json", tmp_path / "rows.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["preset"] for r in rows] == ["tiny", "tiny-tokens"]
    assert re.search(r"fast bf16 (yes|no)$", result.stdout.splitlines()[0])
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


def test_gpu_step_time_times_the_whole_step_and_the_unet_alone_per_batch():
    result = run_script("bench/gpu_step_time.py", "--preset", "tiny-tokens", "--batches", 2, 4, "--repeats", 1)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^tiny-tokens batch (\d+): (train.py's step|forward \+ backward): ([\d.]+) ms/step, (\d+) "
                      r"images/s$", result.stdout, re.M)
    assert [(batch, what) for batch, what, _, _ in rows] == [("2", "train.py's step"), ("2", "forward + backward"),
                                                            ("4", "train.py's step"), ("4", "forward + backward")]
    for batch, _, milliseconds, images in rows:
        assert int(images) == pytest.approx(int(batch) / (float(milliseconds) / 1000), rel=0.02, abs=1)


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


def copy_of_the_checkout(box):
    """What the device tool sends: the files git does not ignore, here without .git and with nothing beside it."""
    import shutil
    import subprocess

    from conftest import REPO

    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (box / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, box / name)
    return box


def rehearse_gpu_run(synthetic_data, tmp_path, preset, **settings):
    """What a lent GPU machine gets: a copy of the checkout with the bundle in it and no ../shared beside it; the
    run must leave at most 8 files of under 16 MiB (64 MiB together), at most 2 folders down. Returns the bundle's
    report, $OUT's files and the environment the run had."""
    import os
    import subprocess
    import sys

    box = copy_of_the_checkout(tmp_path / "box" / "checkout")
    bundle = run_script("bench/gpu_bundle.py", "--data-dir", synthetic_data, "--preset", preset, "--out",
                        box / "gpu-bundle", "--no-wheels")
    assert bundle.returncode == 0, bundle.stderr
    assert (box / "gpu-bundle" / "data" / "iclevr.npz").is_file() and not (box / "gpu-bundle" / "data" / "iclevr").exists()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "ICLEVR_DATA_DIR"}
    env.update(OUT=str(out), PRESET=preset, BATCH="8", PYTHON=sys.executable, **settings)
    run = subprocess.run(["bash", "bench/gpu_run.sh"], cwd=box, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in files)
    assert sum(p.stat().st_size for p in files) < 64 * 2**20
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    return bundle.stdout, out, files, env


def import_gpu_run(out, model, env):
    """bench/gpu_import.sh, run from the checkout itself as back on the CPU box."""
    import subprocess

    from conftest import REPO

    imported = subprocess.run(["bash", "bench/gpu_import.sh", str(out), str(model)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    assert imported.returncode == 0, imported.stderr[-3000:]


def test_gpu_rehearsal_runs_from_the_bundle_alone(synthetic_data, tmp_path):
    """The run leaves its model in parts within the $OUT limits, and they turn back into a model folder."""
    from model import load_pipeline

    _, out, files, env = rehearse_gpu_run(synthetic_data, tmp_path, "tiny-tokens", MINUTES="0.3")
    assert len(files) >= 4
    summary = (out / "summary.txt").read_text()
    assert "images seen" in summary and "images/s" in summary
    import_gpu_run(out, tmp_path / "model", {**env, "SCORE": "0", "UPSAMPLER_FROM": ""})
    pipe = load_pipeline(tmp_path / "model")
    assert pipe.unet.config.preset == "tiny-tokens" and pipe.sampling_settings["steps"] == 20


def test_gpu_rehearsal_of_a_model_too_big_to_come_back(synthetic_data, synthetic_evaluator, tmp_path):
    """A 64-pixel preset from its JPEG bundle, with no room to return the model (as for `seed`, whose 228 MB exceed
    the 60 MiB of parts that come back): the run draws the bundle's conditions there, seeds 0-2, within the $OUT
    limits, and gpu_import.sh scores those images here."""
    report, out, files, env = rehearse_gpu_run(synthetic_data, tmp_path, "tiny", MINUTES="0.2", RETURN_MIB="0")
    assert "64x64, JPEG quality 95" in report
    assert sorted(p.name for p in files) == ["curves.png", "metrics.jsonl", "samples.tar", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "too big to come back" in summary and "files in OUT: 4," in summary
    checkpoint, _ = synthetic_evaluator
    import_gpu_run(out, tmp_path / "gpu" / "model", {**env, "EVALUATOR": str(checkpoint), "DATA": str(synthetic_data)})
    results = json.loads((tmp_path / "gpu" / "evaluation.json").read_text())["results"]
    assert set(results) == {"test", "new_test", "random-96-5"}
    assert all(set(result["seeds"]) == {"0", "1", "2"} for result in results.values())
    assert not (tmp_path / "gpu" / "model").exists()


def test_gpu_bundle_is_refused_where_it_would_not_fit_beside_the_checkout(synthetic_data, tmp_path):
    """The checkout and the bundle travel together (64 MiB): a checkout grown by 60 MiB leaves no room."""
    box = copy_of_the_checkout(tmp_path / "checkout")
    with open(box / "big.bin", "wb") as big:  # a sparse file: its size counts, it costs no disk
        big.truncate(60 * 2**20)
    result = run_script(box / "bench/gpu_bundle.py", "--data-dir", synthetic_data, "--preset", "tiny-tokens",
                        "--out", box / "gpu-bundle", "--no-wheels")
    error = result.stderr.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
    assert result.returncode == 2 and "left beside the checkout" in error and "the checkout itself is" in error, error
    assert "Traceback" not in result.stderr and not (box / "gpu-bundle").exists()
    (box / "big.bin").unlink()
    result = run_script(box / "bench/gpu_bundle.py", "--data-dir", synthetic_data, "--preset", "tiny-tokens",
                        "--out", box / "gpu-bundle", "--no-wheels")
    assert result.returncode == 0 and "to spare beside the checkout" in result.stdout, result.stderr


def test_sample_speed_times_each_setting_against_an_interleaved_baseline(tiny_run, synthetic_data):
    """--baseline: each configuration's seconds beside its share of the baseline's, timed in turn in one run."""
    result = run_script("bench/sample_speed.py", "--model", tiny_run / "model", "--conditions",
                        synthetic_data / "test.json", "--configs", "ddim:2", "dpm++:2", "--baseline", "ddim:4",
                        "--repeats", 2)
    assert result.returncode == 0, result.stderr
    assert "x ddim:4" in result.stdout
    rows = re.findall(r"^(ddim|dpm\+\+)\s+2\s+fp32\s+([\d.]+)\s+-\s+([\d.]+)$", result.stdout, re.M)
    assert [sampler for sampler, _, _ in rows] == ["ddim", "dpm++"], result.stdout
    assert all(float(seconds) > 0 and 0 < float(ratio) for _, seconds, ratio in rows)


def test_sample_speed_skips_bf16_where_it_would_be_emulated(tiny_run, synthetic_data):
    """bf16 on a CPU without AMX-BF16 or AVX512-BF16 is emulated, far slower than fp32: its row says skipped
    there, and is timed where the CPU has it."""
    from model import fast_bf16

    result = run_script("bench/sample_speed.py", "--model", tiny_run / "model", "--conditions",
                        synthetic_data / "test.json", "--configs", "ddim:2", "--precisions", "fp32", "bf16")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^ddim\s+2\s+fp32\s+[\d.]+\s", result.stdout, re.M), result.stdout
    bf16 = re.search(r"^ddim\s+2\s+bf16\s+(\S+)", result.stdout, re.M).group(1)
    assert (bf16 == "skipped") == (not fast_bf16("cpu")), result.stdout


def test_sample_speed_draws_the_baseline_with_another_model_folder(tiny_run, synthetic_data):
    """--baseline-model: a student timed against its teacher; without --baseline it is a one-line error."""
    common = ["--model", tiny_run / "model", "--conditions", synthetic_data / "test.json", "--configs", "ddim:2"]
    result = run_script("bench/sample_speed.py", *common, "--baseline", "ddim:2", "--baseline-model",
                        tiny_run / "checkpoints" / "step-00000020")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^ddim\s+2\s+fp32\s+[\d.]+\s+-\s+[\d.]+$", result.stdout, re.M), result.stdout
    result = run_script("bench/sample_speed.py", *common, "--baseline-model", tiny_run / "model")
    assert result.returncode == 2 and "--baseline-model needs --baseline" in result.stderr.strip().splitlines()[-1]


def test_speed_accuracy_figure_draws_the_given_points(tmp_path):
    points = {"title": "t", "points": [{"setting": "ddim 20", "seconds": 40.0, "accuracy": 0.98, "std": 0.01},
                                       {"setting": "ddim 10", "seconds": 20.0, "accuracy": 0.95}],
              "target": {"seconds": 2, "accuracy": 0.97}}
    (tmp_path / "points.json").write_text(json.dumps(points))
    result = run_script("bench/speed_accuracy.py", "--points", tmp_path / "points.json", "--out", tmp_path / "f.png")
    assert result.returncode == 0, result.stderr
    assert "(2 points)" in result.stdout and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text(json.dumps({"points": [{"setting": "x"}]}))
    result = run_script("bench/speed_accuracy.py", "--points", tmp_path / "bad.json", "--out", tmp_path / "g.png")
    assert result.returncode == 2 and not (tmp_path / "g.png").exists()
