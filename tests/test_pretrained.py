"""The model shipped in pretrained/: it loads, samples with the settings it was measured with, the same images
for the same seed, and (where the project's evaluator is at hand) draws the objects it is asked for."""
import json
import numpy as np
import pytest
import torch

from conftest import REAL_DATA, REPO

SHIPPED = sorted(p for p in (REPO / "pretrained").glob("*") if (p / "model_index.json").is_file())
# each folder with its default settings (None) and each named profile (sampling.json "profiles": "fast", a guidance
# student of the folder's UNet that draws in one pass a step what the default draws in two)
SETTINGS = [(folder, profile) for folder in SHIPPED
            for profile in [None, *json.loads((folder / "sampling.json").read_text()).get("profiles", {})]]
EVALUATOR = REAL_DATA.parent / "evaluator" / "checkpoint.pth"
# Accuracy on the 24 one-object requests below, shipped model (r20-dose, the ninth: tokens-wide, v-prediction, with
# its learned upsampler), its sampling.json (DDIM 20, guidance 3, bf16 falling back to fp32 on an AVX2 CPU), seed 0:
# 22 of 24 right (the eighth: 23; chance is 1 in 24 = 0.042); its profile fast (rank-8 student d6, UniPC 14 steps):
# 24 of 24. 0.85 lets 3 images of 24 go wrong (bf16, where the CPU has it, changes the images a little).
THRESHOLD = 0.85
# 16 three-object requests (random_conditions seed 0), seed 0: 48 of 48 labels read (held-out 3-object requests:
# 0.96-0.98, docs/RESULTS.md "Run r20-dose"; profile fast: 48 of 48); the seventh model reads 0.8125 of them and
# would fail. 0.85 lets 7 of 48 go wrong.
THREE_OBJECT_THRESHOLD = 0.85


def test_a_model_is_shipped_small():
    from cli import folder_megabytes
    from model import FOLDER_CODE

    assert SHIPPED, "pretrained/ holds no model folder"
    for folder in SHIPPED:
        # a clone stays quick, and the checkout leaves room for a GPU bundle (23 MiB for tokens) in the 64 MiB
        # that may travel to a lent machine (bench/gpu_bundle.py)
        assert folder_megabytes(folder) <= 36, f"{folder.name}: {folder_megabytes(folder):.1f} MB"
        settings = json.loads((folder / "sampling.json").read_text())
        for one in [settings, *settings.pop("profiles", {}).values()]:
            assert {"sampler", "steps", "guidance_scale"} <= set(one) <= {
                "sampler", "steps", "guidance_scale", "guidance_max_t", "guidance_by_objects", "joint_weight",
                "precision"}
        card = (folder / "README.md").read_text()  # the model card: what it is, its scores, how to load it
        assert "load_pipeline" in card and "test.json" in card and "How it was trained" in card
        assert card.startswith("---\nlibrary_name: diffusers\n") and "trust_remote_code=True" in card
        for place in (folder, folder / "unet", folder / "upsampler"):  # diffusers alone runs this code: ours
            for name in FOLDER_CODE:
                assert (place / name).read_bytes() == (REPO / name).read_bytes(), (
                    f"{place / name} is not the project's {name}: re-export the folder (python export.py {folder} "
                    f"/tmp/fresh && rm -r {folder} && mv /tmp/fresh {folder}: the same weights, settings and card)")
        assert (folder / "manifest.json").is_file()


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda p: p[0].name + (f"-{p[1]}" if p[1] else ""))
def shipped(request):
    from model import prepare_pipeline

    folder, profile = request.param
    pipe, settings = prepare_pipeline(folder, profile=profile)
    return request.param, pipe, settings


def test_loads_and_samples_deterministically_with_its_settings(shipped):
    from model import PROFILE_UNET, fast_bf16, generate

    (folder, profile), pipe, settings = shipped
    stored = json.loads((folder / "sampling.json").read_text())
    expected = stored["profiles"][profile] if profile else {k: v for k, v in stored.items() if k != "profiles"}
    if expected.get("precision") == "bf16" and not fast_bf16(pipe.device.type):
        # emulated bf16 is slower than fp32: the pipeline falls back to fp32, which to_json leaves unsaid
        expected = {k: v for k, v in expected.items() if k != "precision"}
    assert settings.to_json() == expected
    # a profile with a UNet file of its own samples with that UNet, a distilled student
    assert pipe.unet.distilled == (profile is not None and (folder / PROFILE_UNET.format(profile)).is_file())
    assert pipe.unet.dtype == torch.float32
    labels = [["red sphere", "cyan cube"], ["gray cylinder"]]
    first = generate(pipe, labels, settings, seed=0)
    again = generate(pipe, labels, settings, seed=0)
    other = generate(pipe, labels, settings, seed=1)
    assert first.shape == (2, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_the_shipped_folder_loads_with_diffusers_alone(tmp_path):
    """DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), in a process that cannot import this
    repository, loads each shipped folder with the code it carries, applies its sampling.json and draws."""
    import os
    import subprocess
    import sys

    for folder in SHIPPED:
        script = (
            "import sys, torch\n"
            "assert not any(p and __import__('os').path.isfile(p + '/model.py') for p in sys.path), sys.path\n"
            "from diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
            f"settings = pipe.use_sampling_json({str(folder)!r}).replace(steps=2)\n"
            "pipe.set_progress_bar_config(disable=True)\n"
            "images = pipe([['red sphere']], settings, generator=torch.Generator().manual_seed(0), output_type='np')\n"
            "print(type(pipe).__name__, type(pipe.unet).__name__, images.images.shape)\n")
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_MODULES_CACHE": str(tmp_path)}
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[:2] == ["ICLEVRPipeline", json.loads(
            (folder / "unet" / "config.json").read_text())["_class_name"]]


def test_draws_the_requested_objects(shipped):
    """24 single-object requests, one per label, scored by the project's evaluator (as in docs/RESULTS.md)."""
    if not EVALUATOR.is_file():
        pytest.skip(f"project evaluator not found at {EVALUATOR}")
    import dataset
    from scoring import score
    from evaluator import evaluation_model
    from model import generate

    _, pipe, settings = shipped
    names = pipe.unet.vocabulary.names
    images = generate(pipe, [[name] for name in names], settings, seed=0)
    accuracy = score(evaluation_model(EVALUATOR, device="cpu"), images, [[n] for n in names],
                     dataset.find_vocabulary())["accuracy"]
    assert accuracy > THRESHOLD, accuracy


def test_draws_three_requested_objects(shipped):
    """Three objects at once, where shapes blur and colours merge: 16 random requests, the project's evaluator."""
    if not EVALUATOR.is_file():
        pytest.skip(f"project evaluator not found at {EVALUATOR}")
    import dataset
    from scoring import score
    from evaluator import evaluation_model
    from model import generate

    _, pipe, settings = shipped
    vocabulary = dataset.find_vocabulary()
    requests = dataset.random_conditions(16, vocabulary, {3: 1.0}, seed=0)
    images = generate(pipe, requests, settings, seed=0)
    accuracy = score(evaluation_model(EVALUATOR, device="cpu"), images, requests, vocabulary)["accuracy"]
    assert accuracy > THREE_OBJECT_THRESHOLD, accuracy
