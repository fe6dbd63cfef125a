"""The learned upsampler: untrained it is exactly bicubic; upsampler.py trains one into a model folder (the UNet's
files untouched), the pipeline and export.py use it, and models with nothing to upsample are refused."""
import hashlib

import numpy as np
import pytest
import torch

from conftest import last_line, run_main


@pytest.fixture(scope="module")
def tokens_folder(tmp_path_factory, vocabulary):
    """An untrained tiny-tokens model (denoises at 32 for 64-pixel images) saved as a model folder."""
    import model

    folder = tmp_path_factory.mktemp("tokens") / "model"
    torch.manual_seed(0)
    model.ICLEVRPipeline(unet=model.build_model("tiny-tokens", vocabulary.names),
                         scheduler=model.training_scheduler()).save_pretrained(folder)
    return folder


def digests(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def upsampled(tokens_folder, synthetic_data, tmp_path_factory):
    """upsampler.py run on the tiny folder for 600 steps (~15 s), written to a new folder: (folder, stdout). Clean
    inputs: on 171 synthetic images the grain of the default needs more steps than a test can spend."""
    out = tmp_path_factory.mktemp("upsampled") / "model"
    code, stdout, stderr = run_main("upsampler.py", tokens_folder, "--out", out, "--data-dir", synthetic_data,
                                    "--max-steps", 600, "--batch-size", 16, "--width", 16, "--depth", 2,
                                    "--held-out-images", 24, "--input-noise", 0)
    assert code in (0, None), stderr
    return out, stdout


def test_an_untrained_upsampler_is_bicubic():
    from model import Upsampler, to_image_size

    sample = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(Upsampler()(sample), to_image_size(sample, 64), atol=1e-6)


def test_training_beats_bicubic_on_held_out_scenes(upsampled, synthetic_data):
    import dataset
    from model import load_pipeline, to_image_size, to_sample_size

    folder, stdout = upsampled
    upsampler = load_pipeline(folder).upsampler
    data = dataset.load_training_set(synthetic_data)
    _, held = dataset.split_off_scenes(data.filenames, 24)
    full = dataset.to_model_input(torch.from_numpy(data.images[held]))
    small = to_sample_size(full, 32)
    with torch.no_grad():
        learned, bicubic = ((upsampler(small) - full) ** 2).mean(), ((to_image_size(small, 64) - full) ** 2).mean()
    assert learned < 0.85 * bicubic, (learned, bicubic)  # measured: 0.71 (+1.5 dB)
    assert "held-out PSNR" in stdout


def test_the_folder_keeps_the_unet_and_the_pipeline_uses_the_upsampler(upsampled, tokens_folder):
    from model import generate, load_pipeline
    from sampling import SamplingSettings

    folder, _ = upsampled
    before, after = digests(tokens_folder), digests(folder)
    unet_files = {path for path in before if path.parts[0] in ("unet", "scheduler")}
    assert unet_files and all(after[path] == before[path] for path in unet_files)
    plain, sharp = load_pipeline(tokens_folder), load_pipeline(folder)
    assert plain.upsampler is None and sharp.upsampler is not None
    labels = [["red sphere", "cyan cube"], ["gray cylinder"]]
    images = generate(sharp, labels, SamplingSettings(steps=3), seed=0)
    assert np.array_equal(images, generate(sharp, labels, SamplingSettings(steps=3), seed=0))
    assert not np.array_equal(images, generate(plain, labels, SamplingSettings(steps=3), seed=0))


def test_an_upsampler_can_be_taken_from_another_folder(upsampled, tokens_folder, synthetic_data, tmp_path):
    from model import load_pipeline

    folder, _ = upsampled
    code, stdout, err = run_main("upsampler.py", tokens_folder, "--out", tmp_path / "taken", "--from", folder,
                                 "--data-dir", synthetic_data, "--held-out-images", 24)
    assert code in (0, None), err
    assert f"with a learned 2x upsampler (taken from {folder})" in stdout and "held-out PSNR" in stdout
    taken, trained = load_pipeline(tmp_path / "taken").upsampler, load_pipeline(folder).upsampler
    assert all(torch.equal(a, b) for a, b in zip(taken.state_dict().values(), trained.state_dict().values()))
    code, _, err = run_main("upsampler.py", tokens_folder, "--out", tmp_path / "none", "--from", tokens_folder,
                            "--data-dir", synthetic_data)
    assert code == 2 and last_line(err).startswith(f"error: {tokens_folder}: no learned 2x upsampler to take")
    assert not (tmp_path / "none").exists()


def test_export_keeps_the_upsampler(upsampled, tmp_path):
    from model import generate, load_pipeline
    from sampling import SamplingSettings

    folder, _ = upsampled
    code, _, stderr = run_main("export.py", folder, tmp_path / "shared", "--steps", 3)
    assert code in (0, None), stderr
    original, exported = load_pipeline(folder), load_pipeline(tmp_path / "shared")
    assert exported.upsampler is not None
    for ours, theirs in zip(original.upsampler.parameters(), exported.upsampler.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-3) and (ours != 0).any()
    labels = [["red sphere"]]
    three = SamplingSettings(steps=3)
    difference = np.abs(generate(original, labels, three).astype(int) - generate(exported, labels, three))
    assert difference.mean() < 2  # fp16 weights: a rounding apart


def test_refuses_a_model_that_denoises_at_full_size(tiny_run, synthetic_data):
    before = digests(tiny_run / "model")
    code, _, stderr = run_main("upsampler.py", tiny_run / "model", "--data-dir", synthetic_data, "--max-steps", 1)
    assert code == 2
    assert last_line(stderr) == ("error: this model denoises at its output size (64 pixels): "
                                 "there is nothing to upsample")
    assert digests(tiny_run / "model") == before


def test_a_failed_run_leaves_the_folder_as_it_was(tokens_folder, tmp_path):
    before = digests(tokens_folder)
    code, _, stderr = run_main("upsampler.py", tokens_folder, "--data-dir", tmp_path / "missing", "--max-steps", 1)
    assert code == 2 and "no such data directory" in last_line(stderr)
    assert digests(tokens_folder) == before
    assert not list(tokens_folder.parent.glob(".tmp-*"))
