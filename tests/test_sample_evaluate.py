import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, last_line, run_main, run_script


def sample(model, out, *args):
    return run_script("sample.py", "--model", model, "--out", out, "--sampler", "ddim", "--steps", 4, *args)


def read_images(folder):
    record = json.loads((folder / "conditions.json").read_text())
    return np.stack([np.asarray(Image.open(folder / name)) for name in record["images"]])


@pytest.fixture(scope="module")
def samples(tiny_run, synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    result = sample(tiny_run / "model", out, "--conditions", synthetic_data / "test.json",
                    synthetic_data / "new_test.json", "--process", "--seed", 3)
    assert result.returncode == 0, result.stderr
    return out


def test_sample_writes_grid_images_conditions_and_process(samples, synthetic_data):
    for name in ("test", "new_test"):
        folder = samples / name
        record = json.loads((folder / "conditions.json").read_text())
        assert record["labels"] == json.loads((synthetic_data / f"{name}.json").read_text())
        assert (record["sampler"], record["steps"], record["guidance_scale"], record["seed"]) == ("ddim", 4, 1.0, 3)
        assert len(read_images(folder)) == 32 and read_images(folder).shape[1:] == (64, 64, 3)
        assert Image.open(folder / "grid.png").size == (8 * 66 + 2, 4 * 66 + 2)  # 8 per row, 2-pixel padding
    # two rows of min(10, steps + 1) columns: the 4 steps and the final image, 0.95 inch each at 100 dpi
    assert Image.open(samples / "process.png").size == (round((0.95 * 5 + 0.9) * 100), 255)
    assert not list(samples.glob(".tmp-*"))


def test_process_columns_follow_the_image_from_noise_to_the_final_one(tiny_run):
    import sample as sample_lib
    from model import generate, load_pipeline, sampling_scheduler
    from sampling import SamplingSettings

    pipe = load_pipeline(tiny_run / "model")
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, "ddim")
    pipe.set_progress_bar_config(disable=True)
    labels = ["red sphere", "cyan cube"]
    settings = SamplingSettings("ddim", 12)
    every = sample_lib.process_columns(pipe, labels, settings, 0, frames=20)  # more frames than steps: all
    titles = [title for title, _, _ in every]
    assert titles == [f"t={int(t)}" for t in pipe.scheduler.timesteps] + ["final"] and titles[0] == "t=999"
    assert all(top.shape == (64, 64, 3) and 0 <= top.min() and top.max() <= 1 for _, top, _ in every)
    assert all(bottom.shape == (64, 64, 3) for _, _, bottom in every[:-1]) and every[-1][2] is None
    chosen = sample_lib.process_columns(pipe, labels, settings, 0, frames=6)
    assert len(chosen) == 6 and chosen[0][0] == "t=999" and chosen[-1][0] == "final"
    assert {title for title, _, _ in chosen} <= set(titles)
    generated = generate(pipe, [labels], settings, 0)[0]
    assert np.array_equal((chosen[-1][1] * 255).round().astype(np.uint8), generated)  # the final image itself


def test_process_frames_are_placed_where_the_picture_changes():
    from sample import process_frames

    # a picture that stays put for 8 steps, then moves in 4: the frames go where it moves
    values = [0.0] * 8 + [0.25, 0.5, 0.75, 1.0]
    pictures = [torch.full((2, 2, 3), v) for v in values]
    assert process_frames(pictures, pictures, 5) == [0, 8, 9, 10, 11]
    assert process_frames(pictures, pictures, 30) == list(range(12))


def test_same_seed_same_images(samples, tiny_run, synthetic_data, tmp_path):
    again = sample(tiny_run / "model", tmp_path, "--conditions", synthetic_data / "test.json", "--seed", 3)
    other = sample(tiny_run / "model", tmp_path / "other", "--conditions", synthetic_data / "test.json", "--seed", 4)
    assert again.returncode == 0 and other.returncode == 0, again.stderr + other.stderr
    assert np.array_equal(read_images(tmp_path / "test"), read_images(samples / "test"))
    assert not np.array_equal(read_images(tmp_path / "other" / "test"), read_images(samples / "test"))


def test_labels_from_the_command_line(tiny_run, tmp_path):
    result = sample(tiny_run / "model", tmp_path, "--labels", "red sphere, cyan cylinder,cyan cube")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "labels" / "conditions.json").read_text())
    assert record["labels"] == [["red sphere", "cyan cylinder", "cyan cube"]] and len(record["images"]) == 1


def test_evaluate_a_sample_folder_matches_the_evaluator(samples, synthetic_evaluator, synthetic_data, tmp_path):
    from dataset import find_vocabulary, to_model_input
    from evaluator import evaluation_model

    checkpoint, _ = synthetic_evaluator
    result = run_script("evaluate.py", "--samples", samples / "test", samples / "new_test", "--evaluator", checkpoint,
                        "--data-dir", synthetic_data, "--json", tmp_path / "e.json", "--reference-images", 60)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "e.json").read_text())["results"]
    model = evaluation_model(checkpoint, device="cpu")
    for name in ("test", "new_test"):
        labels = json.loads((samples / name / "conditions.json").read_text())["labels"]
        images = to_model_input(torch.from_numpy(read_images(samples / name)))
        expected = model.eval(images, find_vocabulary().encode_all(labels))
        assert results[name]["seeds"]["3"]["accuracy"] == pytest.approx(expected)
        assert results[name]["frechet"] > 0 and results[name]["frechet_reference"] == 60
        # real images against other real ones: the floor a perfect generator would reach
        assert 0 < results[name]["frechet_floor"] < results[name]["frechet"]
        assert f"{name:<16s}" in result.stdout


def test_sample_folders_of_one_name_drawn_with_other_seeds_are_scored_as_one_set(samples, tiny_run, synthetic_evaluator,
                                                                                synthetic_data, tmp_path):
    """s3/test, s4/test (what a GPU run brings back for a model too big to return) score as one set with its mean; a
    folder of the same name holding other requests is scored on its own."""
    import shutil

    checkpoint, _ = synthetic_evaluator
    other_seed = sample(tiny_run / "model", tmp_path / "s4", "--conditions", synthetic_data / "test.json", "--seed", 4)
    assert other_seed.returncode == 0, other_seed.stderr
    other_requests = tmp_path / "elsewhere" / "test"
    shutil.copytree(samples / "new_test", other_requests)
    result = run_script("evaluate.py", "--samples", samples / "test", tmp_path / "s4" / "test", other_requests,
                        "--evaluator", checkpoint, "--data-dir", synthetic_data, "--json", tmp_path / "e.json",
                        "--reference-images", 0)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "e.json").read_text())["results"]
    assert set(results) == {"test", str(other_requests)} and set(results["test"]["seeds"]) == {"3", "4"}
    accuracies = [results["test"]["seeds"][seed]["accuracy"] for seed in ("3", "4")]
    assert results["test"]["mean"] == pytest.approx(np.mean(accuracies)) and "mean±std" in result.stdout
    assert set(results[str(other_requests)]["seeds"]) == {"3"}


def test_generate_and_score_in_one_go_equals_sample_then_score(samples, tiny_run, synthetic_evaluator,
                                                              synthetic_data, tmp_path):
    checkpoint, _ = synthetic_evaluator
    scored = run_script("evaluate.py", "--samples", samples / "test", "--evaluator", checkpoint, "--data-dir",
                        synthetic_data, "--json", tmp_path / "a.json", "--reference-images", 0)
    assert scored.returncode == 0, scored.stderr
    # seeds 0..3 include seed 3, which sample.py used above with the same sampler and steps
    direct = run_script("evaluate.py", "--model", tiny_run / "model", "--conditions", synthetic_data / "test.json",
                        "random:20:7", "--seeds", 4, "--sampler", "ddim", "--steps", 4, "--evaluator", checkpoint,
                        "--data-dir", synthetic_data, "--json", tmp_path / "b.json", "--reference-images", 0)
    assert direct.returncode == 0, direct.stderr
    a = json.loads((tmp_path / "a.json").read_text())["results"]["test"]
    b = json.loads((tmp_path / "b.json").read_text())["results"]
    assert b["test"]["seeds"]["3"]["accuracy"] == pytest.approx(a["seeds"]["3"]["accuracy"])
    accuracies = [b["test"]["seeds"][str(s)]["accuracy"] for s in range(4)]
    assert b["test"]["mean"] == pytest.approx(np.mean(accuracies))
    assert b["test"]["std"] == pytest.approx(np.std(accuracies))
    assert set(b) == {"test", "random-20-7"} and len(b["random-20-7"]["seeds"]) == 4
    assert "mean±std" in direct.stdout


def test_export_ships_half_precision_weights_with_their_sampling_settings(tiny_run, tmp_path):
    """export.py: fp16 safetensors and sampling.json; sample.py uses those settings unless a flag overrides them
    (the folder's steps only with its own sampler)."""
    from safetensors.torch import load_file

    from model import load_pipeline

    shipped = tmp_path / "shipped"
    result = run_script("export.py", tiny_run / "model", shipped, "--sampler", "ddim", "--steps", 3,
                        "--guidance-scale", 2, "--guidance-max-t", 500)
    assert result.returncode == 0, result.stderr
    weights = load_file(shipped / "unet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    original, loaded = load_pipeline(tiny_run / "model"), load_pipeline(shipped)
    assert loaded.unet.dtype == torch.float32 and loaded.sampling_settings == {"sampler": "ddim", "steps": 3,
                                                                               "guidance_scale": 2.0,
                                                                               "guidance_max_t": 500}
    x, t, y = torch.randn(2, 3, 64, 64), torch.tensor([10, 900]), torch.eye(24)[:2]
    with torch.no_grad():
        assert torch.allclose(original.unet(x, t, y), loaded.unet(x, t, y), atol=2e-2)

    def settings(*flags):
        out = tmp_path / f"s{len(flags)}"
        code, _, err = run_main("sample.py", "--model", shipped, "--out", out, "--labels", "red sphere", *flags)
        assert code == 0, err
        record = json.loads((out / "labels" / "conditions.json").read_text())
        return record["sampler"], record["steps"], record["guidance_scale"], record.get("guidance_max_t")

    assert settings() == ("ddim", 3, 2.0, 500)
    from model import prepare_pipeline
    # a folder without sampling.json (train.py's model/ when it did not evaluate): DDIM, not dpm++ (at chance on
    # epsilon models with linear betas) or ddpm (1000 steps)
    assert not (tiny_run / "model" / "sampling.json").exists()
    assert prepare_pipeline(tiny_run / "model")[1].to_json() == {"sampler": "ddim", "steps": 50, "guidance_scale": 1.0}
    assert settings("--steps", 2, "--guidance-scale", 1) == ("ddim", 2, 1.0, 500)
    assert settings("--sampler", "dpm++", "--steps", 2, "--guidance-max-t", 1000) == ("dpm++", 2, 2.0, 1000)
    assert settings("--sampler", "dpm++", "--seed", 1) == ("dpm++", 25, 2.0, 500)  # not the folder's 3 ddim steps
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_re_export_keeps_the_sources_sampling_settings(tiny_run, tmp_path):
    """export.py SRC DST without sampling flags writes SRC's sampling.json, not DDIM 50 / guidance 1 / fp32 (a
    re-export of the shipped model used to lose its settings); a flag still overrides one setting."""
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    stored = ["--sampler", "ddim", "--steps", 3, "--guidance-scale", 2, "--guidance-by-objects", "2:4:600",
              "--joint-weight", 0.25, "--precision", "bf16"]
    assert run_script("export.py", tiny_run / "model", first, *stored).returncode == 0
    written = json.loads((first / "sampling.json").read_text())
    assert written == {"sampler": "ddim", "steps": 3, "guidance_scale": 2.0, "precision": "bf16", "joint_weight": 0.25,
                       "guidance_by_objects": {"2": {"guidance_scale": 4.0, "guidance_max_t": 600}}}
    code, out, err = run_main("export.py", first, again)
    assert code == 0, err
    assert json.loads((again / "sampling.json").read_text()) == written
    assert "ddim, 3 steps, guidance 2; 2 objects: guidance 4 below t=600, bf16" in out
    code, _, err = run_main("export.py", first, changed, "--guidance-scale", 5, "--precision", "fp32")
    assert code == 0, err
    expected = {k: v for k, v in written.items() if k != "precision"}
    assert json.loads((changed / "sampling.json").read_text()) == {**expected, "guidance_scale": 5.0}


def test_a_named_profile_ships_beside_the_default_settings(tiny_run, tmp_path):
    """export.py --as-profile fast writes the flags as profile "fast" and keeps the default settings;
    sample.py --profile fast samples with it (a flag still overrides it); a re-export keeps the profiles; a missing
    profile and a bad one are one line each."""
    shipped, again = tmp_path / "shipped", tmp_path / "again"
    assert run_script("export.py", tiny_run / "model", shipped, "--steps", 3, "--guidance-scale", 2).returncode == 0
    code, out, err = run_main("export.py", shipped, again, "--as-profile", "fast", "--steps", 2, "--sampler", "ddim")
    assert code == 0, err
    stored = json.loads((again / "sampling.json").read_text())
    default = {"sampler": "ddim", "steps": 3, "guidance_scale": 2.0}
    assert stored == {**default, "profiles": {"fast": {**default, "steps": 2}}}
    assert "samples with ddim, 3 steps, guidance 2, fp32; profile fast: ddim, 2 steps, guidance 2, fp32" in out
    assert run_script("export.py", again, tmp_path / "third").returncode == 0
    assert json.loads((tmp_path / "third" / "sampling.json").read_text()) == stored

    def record(*flags):
        out = tmp_path / f"s{len(flags)}"
        code, _, err = run_main("sample.py", "--model", again, "--out", out, "--labels", "red sphere", *flags)
        assert code == 0, err
        return json.loads((out / "labels" / "conditions.json").read_text())

    assert record()["steps"] == 3 and "profile" not in record()
    fast = record("--profile", "fast")
    assert (fast["profile"], fast["steps"], fast["guidance_scale"]) == ("fast", 2, 2.0)
    assert record("--profile", "fast", "--guidance-scale", 1)["guidance_scale"] == 1.0
    code, _, err = run_main("sample.py", "--model", again, "--out", tmp_path / "no", "--labels", "red sphere",
                            "--profile", "slow")
    assert (code, last_line(err)) == (2, "error: --profile slow: the model folder's sampling.json has no such "
                                         "profile (it has: fast)")
    code, _, err = run_main("sample.py", "--model", shipped, "--out", tmp_path / "no", "--labels", "red sphere",
                            "--profile", "fast")
    assert (code, last_line(err)) == (2, "error: --profile fast: the model folder's sampling.json has no such "
                                         "profile (it has none)")
    (again / "sampling.json").write_text(json.dumps({**stored, "profiles": {"fast": {"sampler": "lcm"}}}))
    (again / "manifest.json").unlink()  # edited by hand: no longer what export.py wrote
    code, _, err = run_main("sample.py", "--model", again, "--out", tmp_path / "no", "--labels", "red sphere",
                            "--profile", "fast")
    assert (code, last_line(err)) == (2, f"error: {again}/sampling.json, profile 'fast': unknown sampler 'lcm' "
                                         f"(choose from ddpm, ddim, dpm++, unipc)")
    assert not (tmp_path / "no").exists()
    code, _, err = run_main("export.py", shipped, tmp_path / "bad", "--as-profile", "fast one")
    assert code == 2 and last_line(err).endswith("error: --as-profile 'fast one': a name of letters, digits, '-' "
                                                 "and '_'")


def test_an_exported_folder_loads_with_diffusers_alone(tiny_run, tmp_path):
    """export.py puts the project's own model code in the folder: DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True) loads it in a process that cannot import this repository, applies its sampling.json in
    one line and draws; the code is the project's, byte for byte; load_pipeline still builds the project's
    classes from it."""
    import model as model_lib

    shipped = tmp_path / "shipped"
    assert run_script("export.py", tiny_run / "model", shipped, "--steps", 3, "--guidance-scale", 2).returncode == 0
    for place in (shipped, shipped / "unet"):
        for name in model_lib.FOLDER_CODE:
            assert (place / name).read_bytes() == (REPO / name).read_bytes()
    card = (shipped / "README.md").read_text()  # the Hub's metadata, and how to load it
    assert card.startswith("---\nlibrary_name: diffusers\n") and "trust_remote_code=True" in card
    assert "datasets:\n- i-CLEVR" in card and "- ICLEVRPipeline" in card
    loaded = model_lib.load_pipeline(shipped)
    assert type(loaded) is model_lib.ICLEVRPipeline and type(loaded.unet) is model_lib.ConditionalUNet
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = (
        "import sys, torch\n"
        "assert not any(p and __import__('os').path.isfile(p + '/model.py') for p in sys.path), sys.path\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(shipped)!r}, trust_remote_code=True)\n"
        f"settings = pipe.use_sampling_json({str(shipped)!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "images = pipe([['red sphere', 'cyan cube']], settings, generator=torch.Generator().manual_seed(0),\n"
        "              output_type='np').images\n"
        "print(type(pipe).__module__, type(pipe).__name__, settings.steps, settings.guidance_scale, images.shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=outside, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    module, name, steps, scale, *shape = result.stdout.split()
    assert not module.startswith("model") and name == "ICLEVRPipeline"  # the folder's copy, not ours
    assert (steps, scale, " ".join(shape)) == ("3", "2.0", "(1, 64, 64, 3)")
    assert "pip install" not in result.stderr  # diffusers' import check finds nothing missing


def test_condition_files_of_one_name_get_folders_of_their_own(tiny_run, synthetic_data, vocabulary, tmp_path):
    """a/test.json and b/test.json used to write both into OUT/test, the second over the first."""
    for folder, requests in (("a", [["red sphere"]]), ("b", [["cyan cube"], ["gray cylinder"]])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.json").write_text(json.dumps(requests))
    code, out, err = run_main("sample.py", "--model", tiny_run / "model", "--conditions", tmp_path / "a" / "test.json",
                              tmp_path / "b" / "test.json", "--steps", 2, "--out", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-test", "b-test"]
    assert len(read_images(tmp_path / "out" / "b-test")) == 2
    evaluator = constant_evaluator(tmp_path / "e.pth", vocabulary, ["red sphere"])
    code, out, err = run_main("evaluate.py", "--model", tiny_run / "model", "--conditions", tmp_path / "a" / "test.json",
                              tmp_path / "b" / "test.json", "--steps", 2, "--evaluator", evaluator, "--data-dir",
                              synthetic_data, "--reference-images", 0, "--json", tmp_path / "e.json")
    assert code == 0, err
    assert set(json.loads((tmp_path / "e.json").read_text())["results"]) == {"a-test", "b-test"}
    code, _, err = run_main("sample.py", "--model", tiny_run / "model", "--conditions", tmp_path / "a" / "test.json",
                            tmp_path / "a" / "test.json", "--steps", 2, "--out", tmp_path / "twice")
    assert code == 2 and "'a-test'" in last_line(err) and not (tmp_path / "twice").exists()


def test_bf16_sampling_is_close_to_fp32_and_stored_with_an_export(tiny_run, tmp_path):
    from model import fast_bf16, generate, prepare_pipeline

    pipe, settings = prepare_pipeline(tiny_run / "model", sampler="ddim", steps=4, guidance_scale=1.0, precision="bf16")
    if not fast_bf16("cpu"):
        assert settings.sampler == "ddim" and settings.precision == "fp32"  # fp32 where bf16 would be emulated
        return
    assert settings.precision == "bf16"
    bf16 = generate(pipe, [["red cube"], ["blue sphere", "gray cylinder"]], settings, 0)
    fp32 = generate(pipe, [["red cube"], ["blue sphere", "gray cylinder"]], settings.replace(precision="fp32"), 0)
    assert not np.array_equal(bf16, fp32)  # bf16 arithmetic was used
    assert np.abs(bf16.astype(float) - fp32.astype(float)).mean() < 8  # out of 255: the same pictures
    exported = run_script("export.py", tiny_run / "model", tmp_path / "exported", "--precision", "bf16")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "exported" / "sampling.json").read_text())["precision"] == "bf16"
    assert prepare_pipeline(tmp_path / "exported")[1].precision == "bf16"
    assert prepare_pipeline(tmp_path / "exported", precision="fp32")[1].precision == "fp32"


def constant_evaluator(path, vocabulary, first_read):
    """A course-format checkpoint that reads every image the same way: the labels of `first_read` first, in that
    order, then the rest by index. Its confusions are known exactly, whatever the images show."""
    from evaluator import resnet18_classifier

    net = resnet18_classifier()
    linear = net.fc[0]
    torch.nn.init.zeros_(linear.weight)
    bias = -torch.arange(len(vocabulary.names), dtype=torch.float32) / 100
    for rank, label in enumerate(first_read):
        bias[vocabulary.names.index(label)] = 5 - rank
    linear.bias.data.copy_(bias)
    torch.save({"model": net.state_dict(), "label_names": vocabulary.names}, path)
    return path


def test_two_evaluators_side_by_side_and_what_each_misread(tiny_run, synthetic_data, vocabulary, write_json, tmp_path):
    requests = [["red cube"], ["red sphere"], ["blue sphere", "red cube"], ["green cylinder"],
                ["red sphere", "red cylinder"]]
    conditions = write_json("five.json", requests)
    first = constant_evaluator(tmp_path / "first.pth", vocabulary, ["red cube", "red sphere"])
    second = constant_evaluator(tmp_path / "second.pth", vocabulary, ["green cylinder", "red sphere"])
    code, out, err = run_main("evaluate.py", "--model", tiny_run / "model", "--conditions", conditions, "--seeds", 2,
                              "--sampler", "ddim", "--steps", 2, "--evaluator", first, "--evaluator", second,
                              "--data-dir", synthetic_data, "--reference-images", 0, "--json", tmp_path / "e.json")
    assert code == 0, err
    written = json.loads((tmp_path / "e.json").read_text())
    ours, theirs = written["results"]["five"], written["other_evaluators"][str(second)]["five"]
    # the first reads "red cube, red sphere": hits 1, 0, 1, 0, 1 of 1, 1, 2, 1, 2 labels
    assert ours["mean"] == pytest.approx(3 / 7) and theirs["mean"] == pytest.approx(2 / 7)
    assert ours["by_objects"] == pytest.approx({"1": 1 / 3, "2": 2 / 4})
    assert theirs["by_objects"] == pytest.approx({"1": 1 / 3, "2": 1 / 4})
    # per seed: red sphere -> red cube and red cylinder -> red cube (the shape), blue sphere -> red sphere (the
    # colour), green cylinder -> red cube (both)
    assert ours["misreadings"]["kinds"] == {"shape": 4, "colour": 2, "both": 2}
    assert ours["misreadings"]["requests"]["1"]["misread"] == [["red sphere", "red cube", "0"],
                                                               ["red sphere", "red cube", "1"]]
    assert ours["misreadings"]["repeated_colour"] == {"requests": 1, "accuracy": pytest.approx(0.5)}
    assert "0" not in ours["misreadings"]["requests"]
    # the second reads "green cylinder, red sphere": red cube pairs with red sphere (same colour) before blue sphere
    # takes what is left
    assert theirs["misreadings"]["requests"]["2"]["misread"][:2] == [["red cube", "red sphere", "0"],
                                                                     ["blue sphere", "green cylinder", "0"]]
    assert theirs["misreadings"]["kinds"] == {"shape": 2, "colour": 2, "both": 6}
    assert "red sphere read as red cube (seed 0, 1)" in out
    assert f"{'five':<16s}" in out and "-0.1429" in out and "-0.2500" in out  # the agreement table's gaps


def test_pooled_sets_count_each_label_once_per_seed(tiny_run, synthetic_data, vocabulary, write_json, tmp_path):
    """--pool scores the sets as one: a set of 7 labels and one of 2 weigh 7 to 2, not one to one."""
    five = write_json("five.json", [["red cube"], ["red sphere"], ["blue sphere", "red cube"], ["green cylinder"],
                                    ["red sphere", "red cylinder"]])
    one = write_json("one.json", [["red cube", "red sphere"]])
    first = constant_evaluator(tmp_path / "first.pth", vocabulary, ["red cube", "red sphere"])
    second = constant_evaluator(tmp_path / "second.pth", vocabulary, ["green cylinder", "red sphere"])
    code, out, err = run_main("evaluate.py", "--model", tiny_run / "model", "--conditions", five, one, "--seeds", 2,
                              "--sampler", "ddim", "--steps", 2, "--evaluator", first, "--evaluator", second, "--pool",
                              "--data-dir", synthetic_data, "--reference-images", 0, "--json", tmp_path / "e.json")
    assert code == 0, err
    pooled = json.loads((tmp_path / "e.json").read_text())["pooled"]
    # the first hits 3 of 7 labels and 2 of 2; the second 2 of 7 and 1 of 2 (red sphere only)
    assert pooled[str(first)]["seeds"] == pytest.approx({"0": 5 / 9, "1": 5 / 9})
    assert pooled[str(first)]["mean"] == pytest.approx(5 / 9) and pooled[str(first)]["std"] == pytest.approx(0)
    assert pooled[str(second)]["mean"] == pytest.approx(3 / 9)
    assert pooled[str(first)]["sets"] == ["five", "one"] and pooled[str(first)]["labels"] == 9
    assert "all 2 sets pooled (9 labels a seed, first.pth): 0.5556" in out


def test_pooling_sets_drawn_with_other_seeds_is_a_one_line_error(samples, tiny_run, synthetic_evaluator,
                                                               synthetic_data, tmp_path):
    checkpoint, _ = synthetic_evaluator
    other = sample(tiny_run / "model", tmp_path / "s4", "--conditions", synthetic_data / "new_test.json", "--seed", 4)
    assert other.returncode == 0, other.stderr
    result = run_script("evaluate.py", "--samples", samples / "test", tmp_path / "s4" / "new_test", "--pool",
                        "--evaluator", checkpoint, "--data-dir", synthetic_data, "--json", tmp_path / "e.json",
                        "--reference-images", 0)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --pool: the sets share no seed (each was drawn with other seeds): nothing to pool")
    assert not (tmp_path / "e.json").exists()


def test_one_line_errors_for_a_missing_second_evaluator(tiny_run, synthetic_data, synthetic_evaluator, tmp_path):
    checkpoint, _ = synthetic_evaluator
    code, out, err = run_main("evaluate.py", "--model", tiny_run / "model", "--evaluator", checkpoint, "--evaluator",
                              tmp_path / "missing.pth", "--data-dir", synthetic_data, "--json", tmp_path / "e.json")
    assert code != 0 and err.strip().startswith("error:") and "missing.pth" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()
