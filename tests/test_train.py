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


def test_object_mask_marks_the_objects_not_the_floor(synthetic_data):
    import numpy as np
    import torch
    from PIL import Image

    import dataset
    from train import object_mask

    image = np.asarray(Image.open(synthetic_data / "iclevr" / "SYNTH_train_000000_2.png"))
    x0 = dataset.to_model_input(torch.from_numpy(image[None].copy()))
    mask = object_mask(x0)[0, 0].bool()
    saturated = torch.from_numpy((image.max(2).astype(int) - image.min(2)) > 60)  # clearly coloured pixels
    assert 0.005 < mask.float().mean() < 0.2
    assert mask[saturated].float().mean() > 0.95      # every coloured object pixel is in the mask
    assert not mask[:8].any()                          # the far floor at the top is not


def test_weighted_losses_match_their_definitions():
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    from model import training_scheduler
    from train import object_mask, training_loss

    scheduler = training_scheduler()
    x0 = torch.rand(4, 3, 64, 64) * 2 - 1
    labels = torch.zeros(4, 24)
    outputs = {}

    def model(noisy, t, y):
        outputs.update(noisy=noisy, t=t)
        return noisy * 0.5

    def loss(**kwargs):
        return training_loss(model, scheduler, x0, labels, torch.Generator().manual_seed(0), 0.0, **kwargs)

    plain = loss()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    error = (outputs["noisy"] * 0.5 - noise) ** 2
    assert plain == pytest.approx(F.mse_loss(outputs["noisy"] * 0.5, noise).item(), rel=1e-5)
    weighted = (error * (1 + 4 * object_mask(x0))).mean()
    assert loss(object_weight=5.0) == pytest.approx(weighted.item(), rel=1e-5)
    snr = compute_snr(scheduler, outputs["t"])
    min_snr = (error.mean((1, 2, 3)) * snr.clamp(max=5.0) / snr).mean()
    assert loss(snr_gamma=5.0) == pytest.approx(min_snr.item(), rel=1e-5)


def evaluations(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "acc_random-8-0" in r]


@pytest.mark.parametrize("schedule, expected_steps", [(["--max-steps", "6", "--eval-every", "3"], [3, 6]),
                                                      (["--max-steps", "6", "--max-minutes", "0",
                                                        "--eval-every-minutes", "100"], [1])])
def test_evaluation_during_training(schedule, expected_steps, synthetic_data, synthetic_evaluator, tmp_path):
    """Accuracy of the EMA weights lands in metrics.jsonl at each due step and for the model a time limit stops."""
    checkpoint, _ = synthetic_evaluator
    result = train(synthetic_data, tmp_path / "r", *schedule, "--evaluator", checkpoint, "--eval-conditions",
                   "random:8:0", "--eval-sampler", "ddim", "--eval-steps", "2")
    assert result.returncode == 0, result.stderr
    records = evaluations(tmp_path / "r")
    assert [r["step"] for r in records] == expected_steps
    assert all(0 <= r["acc_random-8-0"] <= 1 and r["train_minutes"] > 0 for r in records)
    assert (tmp_path / "r" / "curves.png").exists()
