import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import last_line, run_main, run_script

TINY = ["--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--warmup-steps", "2"]


def train(data_dir, out, *args, **kwargs):
    return run_script("train.py", "--data-dir", data_dir, "--out", out, *TINY, *args, **kwargs)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


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


def test_init_starts_from_a_trained_model(tiny_run, synthetic_data, tmp_path):
    """--init copies a model folder's weights into a new run (one step at a negligible rate leaves them as they
    were, where a run without --init differs), and refuses a model of another preset or prediction type."""
    from model import load_pipeline

    def weights(run):
        return load_pipeline(run / "model").unet.state_dict()

    trained = weights(tiny_run)
    for name, extra in (("init", ["--init", tiny_run / "model"]), ("fresh", [])):
        result = train(synthetic_data, tmp_path / name, "--max-steps", 1, "--lr", 1e-12, *extra)
        assert result.returncode == 0, result.stderr
        # said for a model without an upsampler too, and only when it happened
        assert (f"initialised from {tiny_run / 'model'}\n" in result.stderr) == (name == "init"), result.stderr
    initialised, fresh = weights(tmp_path / "init"), weights(tmp_path / "fresh")
    assert all(torch.allclose(initialised[k], trained[k], atol=1e-6) for k in trained)
    assert not all(torch.allclose(fresh[k], trained[k], atol=1e-6) for k in trained)

    older = tmp_path / "older"  # a folder from before models recorded their largest training scene
    shutil.copytree(tiny_run / "model", older)
    config = json.loads((older / "unet" / "config.json").read_text())
    del config["trained_objects"]
    (older / "unet" / "config.json").write_text(json.dumps(config))
    (older / "manifest.json").unlink()
    result = train(synthetic_data, tmp_path / "from-older", "--max-steps", 1, "--init", older)
    assert result.returncode == 0, result.stderr
    assert load_pipeline(tmp_path / "from-older" / "model").unet.config.trained_objects == 3
    larger = tmp_path / "larger"  # a folder that read 6-object scenes: a run on 3-object data keeps drawing them
    shutil.copytree(older, larger)
    (larger / "unet" / "config.json").write_text(json.dumps({**config, "trained_objects": 6}))
    result = train(synthetic_data, tmp_path / "from-larger", "--max-steps", 1, "--init", larger)
    assert result.returncode == 0, result.stderr
    assert load_pipeline(tmp_path / "from-larger" / "model").unet.config.trained_objects == 6

    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "other", *TINY,
                            "--preset", "tiny-tokens", "--init", tiny_run / "model")
    assert code == 2 and "preset=tiny, but this run has preset=tiny-tokens" in last_line(err)
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "v", *TINY,
                            "--prediction-type", "v_prediction", "--init", tiny_run / "model")
    assert code == 2 and "predicts epsilon, but this run trains v_prediction" in last_line(err)


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
    from training import object_mask

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
    from training import object_mask, training_loss

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
    # the exported model and its checkpoint carry the settings they were evaluated with
    evaluated_with = {"sampler": "ddim", "steps": 2, "guidance_scale": 1.0}
    checkpoint_dir = sorted((tmp_path / "r" / "checkpoints").iterdir())[-1]
    for folder in (tmp_path / "r" / "model", checkpoint_dir / "pipeline"):
        assert json.loads((folder / "sampling.json").read_text()) == evaluated_with


def meter_for(synthetic_data, size=64):
    """A meter on 12 synthetic images."""
    import dataset
    from model import training_scheduler
    from metrics import ConditioningMeter

    data = dataset.load_training_set(synthetic_data)
    held = data.subset(range(12))
    return ConditioningMeter(held, training_scheduler(), size, bands=4, seed=0, batch_size=16), held


def test_meter_is_zero_for_a_model_that_ignores_its_labels(synthetic_data):
    import torch

    meter, _ = meter_for(synthetic_data)
    blind = torch.nn.Module()
    blind.forward = lambda x, t, y: x * 0.3
    record = meter(blind, "cpu")
    gaps = [record[f"meter_share_t{start}"] for start in (0, 250, 500, 750)]
    assert gaps == [0.0] * 4 and record["meter_share"] == 0.0 and record["meter_loss"] > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_meter_is_the_share_of_the_loss_the_labels_remove(synthetic_data, prediction_type):
    """A model that predicts its target exactly when it sees labels and half of it without them: its loss with
    labels is 0 and without them a quarter of the target's square, so the labels remove all of it (gap 1) in
    every band. Calls are repeatable."""
    import torch

    import dataset
    from model import training_scheduler
    from metrics import ConditioningMeter

    data = dataset.load_training_set(synthetic_data)
    meter = ConditioningMeter(data.subset(range(12)), training_scheduler(prediction_type=prediction_type), 32,
                              bands=4, seed=0, batch_size=16)
    assert meter.noisy.shape == (48, 3, 32, 32)
    assert sorted(meter.t.div(250, rounding_mode="floor").unique().tolist()) == [0, 1, 2, 3]
    lookup = {(int(t), round(float(x.sum()), 2)): y for x, t, y in zip(meter.noisy, meter.t, meter.target)}

    class Oracle(torch.nn.Module):
        """The exact target with labels; half of it without them (or always half, when blind to labels)."""

        def __init__(self, blind=False):
            super().__init__()
            self.blind = blind

        def forward(self, x, t, y):
            exact = torch.stack([lookup[(int(ti), round(float(xi.sum()), 2))] for xi, ti in zip(x, t)])
            sees = torch.zeros(len(y)) if self.blind else (y.sum(1) > 0).float()
            return exact * (0.5 + 0.5 * sees)[:, None, None, None]

    first, second = meter(Oracle(), "cpu"), meter(Oracle(), "cpu")
    assert first == second and first["meter_loss"] == 0.0
    for start in (0, 250, 500, 750):
        assert first[f"meter_share_t{start}"] == 1.0
    blind = meter(Oracle(blind=True), "cpu")
    assert all(blind[f"meter_share_t{start}"] == 0.0 for start in (0, 250, 500, 750)) and blind["meter_loss"] > 0


def test_training_logs_the_meter_on_held_out_scenes(synthetic_data, tmp_path):
    import dataset

    result = train(synthetic_data, tmp_path / "r", "--max-steps", "4", "--meter-every", "2", "--meter-images", "6")
    assert result.returncode == 0, result.stderr
    meters = [r for r in records(tmp_path / "r") if "meter_share" in r]
    assert [r["step"] for r in meters] == [0, 2, 4]
    assert all(set(r) >= {"meter_share_t0", "meter_share_t750", "meter_loss", "train_minutes"} for r in meters)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    names = sorted(json.loads((synthetic_data / "train.json").read_text()))
    kept, held = dataset.split_off_scenes(names, 6)
    assert config["training_images"] == len(kept) == len(names) - len(held) and len(held) >= 6
    off = train(synthetic_data, tmp_path / "off", "--max-steps", "2", "--meter-every", "0")
    assert off.returncode == 0, off.stderr
    assert not [r for r in records(tmp_path / "off") if "meter_share" in r]
    assert json.loads((tmp_path / "off" / "config.json").read_text())["training_images"] == len(names)


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_timestep_power_favours_high_noise(power):
    """Density proportional to (t/T)^(P-1): the mean of t/T is P/(P+1); power 1 is torch.randint itself."""
    import torch

    from training import training_timesteps

    t = training_timesteps(200_000, 1000, torch.Generator().manual_seed(0), "cpu", power)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    assert abs((t.float() + 0.5).mean().item() / 1000 - power / (power + 1)) < 0.005
    if power == 1.0:
        assert torch.equal(t, torch.randint(0, 1000, (200_000,), generator=torch.Generator().manual_seed(0)))


def test_evaluation_during_training_uses_the_upsampler_the_export_will_have(synthetic_data, tmp_path):
    """A run started with --init from a folder with a learned upsampler evaluates and exports with it (also after
    a resume without --init); a 32x32 run without one marks its accuracy records as bicubic."""
    import evaluator
    from model import ICLEVRPipeline, Upsampler, load_pipeline

    torch.save({"model": evaluator.resnet18_classifier().state_dict()}, tmp_path / "evaluator.pth")
    tokens = ["--preset", "tiny-tokens", "--evaluator", tmp_path / "evaluator.pth", "--eval-every", 2,
              "--eval-conditions", "random:4", "--eval-steps", 2, "--meter-every", 0]
    plain = train(synthetic_data, tmp_path / "plain", "--max-steps", 2, *tokens)
    assert plain.returncode == 0, plain.stderr
    pipe = load_pipeline(tmp_path / "plain" / "model")
    upsampler = Upsampler()
    with torch.no_grad():
        upsampler.correction[-1].weight.normal_(0, 0.01)  # no longer plain bicubic
    ICLEVRPipeline(unet=pipe.unet, scheduler=pipe.scheduler, upsampler=upsampler).save_pretrained(tmp_path / "init")

    run = tmp_path / "init-run"
    started = train(synthetic_data, run, "--max-steps", 2, "--init", tmp_path / "init", *tokens)
    assert started.returncode == 0, started.stderr
    assert f"initialised from {tmp_path / 'init'} (and its learned upsampler)" in started.stderr
    resumed = train(synthetic_data, run, "--max-steps", 4, "--resume", "latest", "--init", tmp_path / "init", *tokens)
    assert resumed.returncode == 0, resumed.stderr
    assert "initialised from" not in resumed.stderr and "resumed from" in resumed.stderr  # the checkpoint's weights

    evaluated = [r for r in records(run) if "acc_random-4" in r]
    assert [r["step"] for r in evaluated] == [2, 4] and not any("eval_upsampling" in r for r in evaluated)
    bicubic = [r for r in records(tmp_path / "plain") if "acc_random-4" in r]
    assert bicubic and all(r["eval_upsampling"] == "bicubic" for r in bicubic)
    exported = load_pipeline(run / "model").upsampler
    assert exported is not None
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), upsampler.state_dict().values()))
    assert load_pipeline(tmp_path / "plain" / "model").upsampler is None


def test_the_training_bar_follows_whichever_limit_ends_the_run_first():
    """Under --max-minutes the bar counts wall-clock seconds up to the time limit (a 7-minute run on a slow
    machine no longer shows hours left), or up to where the step limit will end at the pace so far, if sooner."""
    import io

    from training import TrainingBar

    now = [100.0]
    slow = TrainingBar(0, 18400, max_minutes=7, clock=lambda: now[0], file=io.StringIO())
    now[0] += 216
    slow.update(306, loss="0.0500")
    assert slow.bar.total == 420 and slow.bar.n == 216
    assert "step=306/18400" in str(slow.bar) and "loss=0.0500" in str(slow.bar)
    now[0] += 205
    slow.update(600)
    slow.close()
    assert slow.bar.n == slow.bar.total == 420  # 100% when the time limit stopped the run

    fast = TrainingBar(50, 150, max_minutes=7, clock=lambda: now[0], file=io.StringIO())
    now[0] += 10
    fast.update(60)  # 10 steps in 10 s: the 100 steps end after 100 s, before the 420-s limit
    assert fast.bar.total == 100 and fast.bar.n == 10

    steps = TrainingBar(5, 20, file=io.StringIO())  # no time limit: steps, as before
    steps.update(12)
    assert steps.bar.total == 20 and steps.bar.n == 12
    interrupted = TrainingBar(0, 100, max_minutes=1, clock=lambda: now[0], file=io.StringIO())
    now[0] += 6
    interrupted.update(3)
    interrupted.close(finished=False)
    assert interrupted.bar.n == 6  # a run stopped by a signal does not claim 100%


def test_bf16_training_on_a_cpu_gives_finite_losses_and_a_loadable_model(synthetic_data, tmp_path):
    from model import load_pipeline

    result = train(synthetic_data, tmp_path / "bf16", "--max-steps", 3, "--mixed-precision", "bf16",
                   "--meter-every", 0)
    assert result.returncode == 0, result.stderr
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(tmp_path / "bf16").values())
    pipe = load_pipeline(tmp_path / "bf16" / "model")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in pipe.unet.parameters())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision_used"] == "bf16"


def test_auto_precision_is_bf16_only_where_it_is_faster(tiny_run, synthetic_data, tmp_path):
    from model import fast_bf16

    config = json.loads((tiny_run / "config.json").read_text())  # trained with the default --mixed-precision auto
    assert config["mixed_precision"] == "auto" and config["precision_used"] == "no"  # tiny: slower in bf16
    result = train(synthetic_data, tmp_path / "tokens", "--preset", "tokens", "--batch-size", 2, "--max-steps", 1,
                   "--meter-every", 0)
    assert result.returncode == 0, result.stderr
    used = json.loads((tmp_path / "tokens" / "config.json").read_text())["precision_used"]
    assert used == ("bf16" if fast_bf16("cpu") else "no")


def test_composite_scenes_teach_one_object_more(synthetic_data, tmp_path):
    """--composite-scenes adds 4-object images: the model records 4 as its largest training scene, so it draws
    4-object requests jointly and composes only beyond."""
    from model import load_pipeline

    plain = json.loads((synthetic_data / "train.json").read_text())
    result = train(synthetic_data, tmp_path / "composite", "--preset", "tiny-tokens", "--max-steps", 1,
                   "--composite-scenes", 16, "--meter-every", 0)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "composite" / "config.json").read_text())
    assert config["training_images"] == len(plain) + 16
    assert load_pipeline(tmp_path / "composite" / "model").unet.config.trained_objects == 4
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", *TINY,
                            "--composite-scenes", -1)
    assert code == 2 and last_line(err).endswith("error: --composite-scenes must be 0 (none) or more")
    last_images = tmp_path / "last.json"  # each scene's last image only: no object added in view
    last_images.write_text(json.dumps({name: labels for name, labels in plain.items() if name.endswith("_2.png")}))
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--train-json", last_images, "--out",
                            tmp_path / "last", *TINY, "--composite-scenes", 16)
    assert code == 2 and last_line(err) == (
        "error: composite scenes need each scene's images in order (NAME_0.png, NAME_1.png, ...), one object "
        "added each time; this data has none")
    assert not (tmp_path / "last" / "checkpoints").exists()


def test_composites_of_several_pastes_teach_five_and_six_objects(synthetic_data, tmp_path):
    """--composite-pastes 3 adds 4-, 5- and 6-object images. An object-token model with 4 tokens would drop
    labels, so it is refused in one line; with 6 tokens the model draws 5 and 6 objects jointly, one UNet row a
    request, the same images for the same seed."""
    from cli import UserError
    from model import load_pipeline

    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "four", *TINY,
                            "--preset", "tiny-tokens", "--composite-scenes", 30, "--composite-pastes", 3)
    assert code == 2 and last_line(err).endswith("(add --model-option max_objects=6)")
    assert not (tmp_path / "four" / "checkpoints").exists()
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", *TINY,
                            "--composite-pastes", 0)
    assert code == 2 and last_line(err).endswith("error: --composite-pastes must be 1 or more")
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", *TINY,
                            "--composite-scenes", 2, "--composite-pastes", 3)
    assert code == 2 and last_line(err).endswith(
        "error: --composite-scenes 2 is too few for --composite-pastes 3: each count of pasted objects needs a share")
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", *TINY,
                            "--composite-scenes", 30, "--composite-pastes", 3, "--composite-shares", 2, 1)
    assert code == 2 and last_line(err).endswith(
        "error: --composite-shares has 2 weights for --composite-pastes 3: give one for each count of pasted objects")
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", *TINY,
                            "--composite-scenes", 30, "--composite-pastes", 2, "--composite-shares", 1, 0)
    assert code == 2 and last_line(err).endswith("error: --composite-shares must be 1 or more each")
    result = train(synthetic_data, tmp_path / "six", "--preset", "tiny-tokens", "--max-steps", 1, "--meter-every", 0,
                   "--composite-scenes", 30, "--composite-pastes", 3, "--model-option", "max_objects=6")
    assert result.returncode == 0, result.stderr
    pipe = load_pipeline(tmp_path / "six" / "model")
    assert (pipe.unet.config.trained_objects, pipe.unet.config.max_objects) == (6, 6)
    pipe.set_progress_bar_config(disable=True)
    requests = [["red sphere", "cyan cube", "gray cylinder", "yellow cube", "blue sphere"],
                ["red sphere", "cyan cube", "gray cylinder", "yellow cube", "blue sphere", "green cylinder"]]
    rows, owner, _ = pipe.sub_requests(pipe.label_vectors(requests), pipe.default_compose_above())
    assert owner.tolist() == [0, 1] and rows.sum(1).tolist() == [5, 6]  # joint: no composition
    with pytest.raises(UserError, match="7 labels, but this model draws at most 6 objects$"):  # none to compose
        pipe.label_vectors([requests[1] + ["brown cube"]])

    def draw(seed):
        return pipe(requests, num_inference_steps=3, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    images = draw(0)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    assert np.array_equal(images, draw(0)) and not np.array_equal(images, draw(1))


def test_a_model_of_four_tokens_can_be_fine_tuned_with_six(synthetic_data, tmp_path):
    """--init from a 4-token model into a 6-token run: the token count is not in the weights, so it is allowed;
    without null_tokens a warning says that every request changes, with null_tokens=4 there is none."""
    from model import load_pipeline

    four = train(synthetic_data, tmp_path / "four", "--preset", "tiny-tokens", "--max-steps", 1, "--meter-every", 0)
    assert four.returncode == 0, four.stderr
    six = ["--preset", "tiny-tokens", "--max-steps", 1, "--meter-every", 0, "--init", tmp_path / "four" / "model",
           "--composite-scenes", 30, "--composite-pastes", 3, "--model-option", "max_objects=6"]
    plain = train(synthetic_data, tmp_path / "plain", *six)
    assert plain.returncode == 0, plain.stderr
    assert ("read 4 object tokens and this run reads 6: more null tokens change what it draws for every request "
            "(--model-option null_tokens=4 keeps its requests of up to 4 objects as they were)") in plain.stderr
    kept = train(synthetic_data, tmp_path / "kept", *six, "--model-option", "null_tokens=4")
    assert kept.returncode == 0, kept.stderr
    assert "object tokens" not in kept.stderr
    config = load_pipeline(tmp_path / "kept" / "model").unet.config
    assert (config.max_objects, config.null_tokens, config.trained_objects) == (6, 4, 6)


def test_report_to_tensorboard_logs_the_metrics_and_a_sample_grid(synthetic_data, tmp_path):
    """--report-to tensorboard: RUN/tensorboard holds every number of metrics.jsonl (loss, learning rate, images/s,
    the meter's bands, the accuracies) at its step, and each evaluation's sample grid; metrics.jsonl stays."""
    pytest.importorskip("tensorboard")
    import evaluator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.save({"model": evaluator.resnet18_classifier().state_dict()}, tmp_path / "evaluator.pth")
    run = tmp_path / "run"
    result = train(synthetic_data, run, "--preset", "tiny-tokens", "--max-steps", 2, "--meter-every", 2,
                   "--evaluator", tmp_path / "evaluator.pth", "--eval-every", 2, "--eval-conditions", "random:4",
                   "--eval-steps", 2, "--report-to", "tensorboard")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "lr", "images_per_s", "train_minutes", "acc_random-4", "meter_share_t0"} <= scalars, scalars
    assert [e.step for e in events.Scalars("loss")] == [1, 2] and events.Scalars("acc_random-4")[0].step == 2
    logged = {r["step"]: r["loss"] for r in records(run) if "loss" in r}
    assert [round(e.value, 5) for e in events.Scalars("loss")] == [round(logged[1], 5), round(logged[2], 5)]
    grid = events.Images("samples/random-4")[0]
    assert grid.step == 2 and (grid.width, grid.height) == (4 * 66 + 2, 66 + 2)  # 4 images of 64, padded by 2
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "r", *TINY,
                            "--report-to", "nothing")
    assert code == 2 and "--report-to: invalid choice: 'nothing'" in last_line(err)
    if importlib.util.find_spec("wandb") is None:
        code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "w", *TINY,
                                "--report-to", "wandb")
        assert code == 2 and last_line(err).endswith("error: --report-to wandb needs the wandb package (pip install "
                                                     "wandb)")


def test_a_recipe_file_trains_and_a_flag_overrides_it(synthetic_data, write_json, tmp_path):
    recipe = write_json("tiny.json", {"about": "a tiny recipe", "preset": "tiny", "batch-size": 4, "lr": 1e-3,
                                      "max-steps": 3, "log-every": 1, "warmup-steps": 1, "meter-every": 0,
                                      "no-flip": True, "model-option": ["layers_per_block=1"],
                                      "eval-conditions": ["random:4", "random:8"]})
    run = tmp_path / "run"
    code, _, err = run_main("train.py", "--recipe", recipe, "--data-dir", synthetic_data, "--out", run,
                            "--max-steps", 2)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == str(recipe)
    assert (config["max_steps"], config["total_steps"]) == (2, 2)  # the command line's, not the file's 3
    assert (config["preset"], config["batch_size"], config["lr"], config["no_flip"]) == ("tiny", 4, 1e-3, True)
    assert config["model_option"] == ["layers_per_block=1"] and config["eval_conditions"] == ["random:4", "random:8"]
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2]


def test_every_shipped_recipe_reads_as_train_py_flags():
    """The recipes in recipes/ name only train.py's flags, with values its parser accepts."""
    from conftest import REPO
    from train import parse_args

    recipes = sorted((REPO / "recipes").glob("*.json"))
    assert len(recipes) >= 5
    for path in recipes:
        args = parse_args(["--recipe", str(path), "--evaluator", "checkpoint.pth"])  # demo.sh's names its own
        assert args.preset == "tokens-wide" and args.prediction_type == "v_prediction", path.name
        assert json.loads(path.read_text())["about"]


@pytest.mark.parametrize("content, message", [
    ({"lr": 1e-3, "batch_sise": 4}, "'batch_sise' is not a flag of train.py (closest: batch-size)"),
    ([1, 2], "a recipe is a JSON object of flags without their dashes"),
    ({"lr-schedule": "linear"}, "argument --lr-schedule: invalid choice: 'linear'"),
])
def test_bad_recipes_are_one_line_errors(synthetic_data, write_json, tmp_path, content, message):
    code, _, err = run_main("train.py", "--recipe", write_json("bad.json", content), "--data-dir", synthetic_data,
                            "--out", tmp_path / "run")
    assert code == 2 and message in last_line(err), err
    assert not (tmp_path / "run").exists()
