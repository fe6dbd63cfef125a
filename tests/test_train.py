import json

import pytest

from conftest import run_script

TINY = ["--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--warmup-steps", "2"]


def train(data_dir, out, *args, **kwargs):
    return run_script("train.py", "--data-dir", data_dir, "--out", out, *TINY, *args, **kwargs)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def twenty_step_run(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = train(synthetic_data, out, "--max-steps", "20", "--checkpoint-every", "10", "--keep", "1")
    assert result.returncode == 0, result.stderr
    return out


def test_twenty_step_run_writes_checkpoint_metrics_and_model(twenty_step_run):
    from model import load_pipeline

    checkpoints = sorted(p.name for p in (twenty_step_run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000020"]  # --keep 1 pruned step 10; no temporary folder left behind
    assert sorted(losses(twenty_step_run)) == list(range(1, 21))
    assert (twenty_step_run / "curves.png").stat().st_size > 1000
    pipe = load_pipeline(twenty_step_run / "model")
    assert pipe.unet.config.preset == "tiny" and len(pipe.unet.config.label_names) == 24
    config = json.loads((twenty_step_run / "config.json").read_text())
    assert config["total_steps"] == 20 and config["parameters"] > 0


def test_checkpoint_is_a_loadable_pipeline(twenty_step_run):
    from model import load_pipeline

    pipe = load_pipeline(twenty_step_run / "checkpoints" / "step-00000020")
    assert pipe.scheduler.config.num_train_timesteps == 1000


def test_existing_run_needs_resume(twenty_step_run, synthetic_data):
    result = train(synthetic_data, twenty_step_run, "--max-steps", "20")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {twenty_step_run} already has checkpoints: add --resume latest to continue, or pick another --out")


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
    result = train(synthetic_data, tmp_path / "r", "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size must be at least 1" in result.stderr
    result = train(tmp_path / "absent", tmp_path / "r2", "--max-steps", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("for generated scenes)")
    assert "no such data directory" in result.stderr
