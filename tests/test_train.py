import json

import pytest

from conftest import last_line, run_main, run_script

TINY = ["--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--warmup-steps", "2"]


def train(data_dir, out, *args, **kwargs):
    return run_script("train.py", "--data-dir", data_dir, "--out", out, *TINY, *args, **kwargs)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_tiny_run_writes_checkpoint_metrics_and_model(tiny_run):
    from model import load_pipeline

    checkpoints = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000020"]  # --keep 1 pruned step 10; no temporary folder left behind
    assert sorted(losses(tiny_run)) == list(range(1, 21))
    assert (tiny_run / "curves.png").stat().st_size > 1000
    pipe = load_pipeline(tiny_run / "model")
    assert pipe.unet.config.preset == "tiny" and len(pipe.unet.config.label_names) == 24
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["total_steps"] == 20 and config["parameters"] > 0


def test_checkpoint_is_a_loadable_pipeline(tiny_run):
    from model import load_pipeline

    pipe = load_pipeline(tiny_run / "checkpoints" / "step-00000020")
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_resume_continues_exactly(synthetic_data, tmp_path):
    """An interrupted run, resumed, logs the same losses as an uninterrupted one with the same seed."""
    whole = train(synthetic_data, tmp_path / "whole", "--max-steps", "6")
    assert whole.returncode == 0, whole.stderr
    # --max-minutes 0 stops after the first step with a checkpoint; --resume latest continues from it
    first = train(synthetic_data, tmp_path / "split", "--max-steps", "6", "--max-minutes", "0")
    assert first.returncode == 0, first.stderr
    assert sorted(losses(tmp_path / "split")) == [1]
    rest = train(synthetic_data, tmp_path / "split", "--max-steps", "6", "--resume", "latest")
    assert rest.returncode == 0, rest.stderr
    assert "resumed from" in rest.stderr and "step 1" in rest.stderr
    expected, resumed = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step


def test_bad_arguments_are_one_line_errors(synthetic_data, tmp_path):
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", "--batch-size", 0)
    assert code == 2 and last_line(err).endswith("error: --batch-size must be at least 1")
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", "--eval-every", 5)
    assert code == 2 and "--eval-every needs --evaluator" in last_line(err)
