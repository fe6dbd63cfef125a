"""Every row of docs/ERRORS.md: the exact last line the user sees, the exit code, and that nothing written
earlier was overwritten or left half-written."""
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import last_line, run_main


def snapshot(folder):
    """Content hash of every file below `folder` (the lock file aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def earlier_samples(tiny_run, synthetic_data, tmp_path_factory):
    """A good sample.py output that the failing commands below must leave exactly as it is."""
    out = tmp_path_factory.mktemp("earlier")
    code, _, err = run_main("sample.py", "--model", tiny_run / "model", "--out", out, "--sampler", "ddim", "--steps", 2,
                            "--conditions", synthetic_data / "test.json", "--labels", "red sphere")
    assert code == 0, err
    return out


CONDITION_FILES = {
    "unknown label": ('[["red sphere"], ["redd sphere"]]',
                      "{f}: entry 1: unknown label 'redd sphere' "
                      "(closest: 'red sphere', 'green sphere', 'purple sphere')"),
    "empty label list": ('[["red sphere"], []]', "{f}: entry 1: empty label list"),
    "duplicate label": ('[["red cube", "blue cube", "red cube"]]', "{f}: entry 0: label 'red cube' appears twice"),
    "malformed json": ('[["red cube"],', "{f}: not valid JSON (line 1, column 15: Expecting value)"),
    "wrong json shape": ('{"a": ["red cube"]}', "{f}: expected a non-empty JSON list of label lists"),
    "entry not a list": ('[["red cube"], "blue cube"]',
                         '{f}: entry 1: expected a list of label names, got "blue cube"'),
}


@pytest.mark.parametrize("case", CONDITION_FILES)
def test_bad_condition_file(case, tiny_run, earlier_samples, tmp_path):
    content, message = CONDITION_FILES[case]
    path = tmp_path / "test.json"
    path.write_text(content)
    before = snapshot(earlier_samples)
    code, _, err = run_main("sample.py", "--model", tiny_run / "model", "--out", earlier_samples, "--conditions", path)
    assert (code, last_line(err)) == (2, "error: " + message.format(f=path))
    assert snapshot(earlier_samples) == before


SAMPLE_ARGUMENTS = {
    "unknown label on the command line": (["--labels", "red sphere,pink cube"],
                                          "--labels: unknown label 'pink cube' "
                                          "(closest: 'cyan cube', 'green cube', 'brown cube')"),
    "missing model folder": (["--model", "{tmp}/nothing", "--labels", "red sphere"],
                             "{tmp}/nothing: no such model folder (train one with train.py; it exports RUN/model)"),
    "unknown model folder": (["--model", "{tmp}", "--labels", "red sphere"],
                             "{tmp}: not a model folder (no model_index.json); pass RUN/model, a run folder or a "
                             "checkpoint folder RUN/checkpoints/step-N"),
    "steps out of range": (["--steps", "5000", "--labels", "red sphere"],
                           "--steps must be between 1 and 1000 (got 5000)"),
    "guidance scale out of range": (["--guidance-scale", "-1", "--labels", "red sphere"],
                                    "--guidance-scale must be between 0 and 20 (got -1; 1 means no guidance)"),
    "guidance limit out of range": (["--guidance-max-t", "2000", "--labels", "red sphere"],
                                    "--guidance-max-t must be between 0 and 1000 (got 2000; 1000 guides every step)"),
}


@pytest.mark.parametrize("case", SAMPLE_ARGUMENTS)
def test_bad_sample_arguments(case, tiny_run, earlier_samples, tmp_path):
    args, message = SAMPLE_ARGUMENTS[case]
    before = snapshot(earlier_samples)
    code, _, err = run_main("sample.py", "--model", tiny_run / "model", "--out", earlier_samples,
                            *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and last_line(err).startswith("error: " + message.format(tmp=tmp_path)), err
    assert snapshot(earlier_samples) == before


def test_unwritable_output_folder(tiny_run, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, _, err = run_main("sample.py", "--model", tiny_run / "model", "--out", tmp_path / "a-file" / "out",
                            "--labels", "red sphere", "--steps", 2, "--sampler", "ddim")
    assert (code, last_line(err)) == (2, f"error: cannot write to {tmp_path}/a-file/out: Not a directory")


def test_missing_evaluator(earlier_samples, tmp_path):
    code, _, err = run_main("evaluate.py", "--samples", earlier_samples / "test", "--evaluator", tmp_path / "no.pth",
                            "--json", earlier_samples / "evaluation.json")
    assert (code, last_line(err)) == (2, f"error: evaluator checkpoint {tmp_path}/no.pth not found: put the course's "
                                         f"checkpoint.pth there, or train one: python evaluator.py train "
                                         f"--data-dir data --out checkpoint.pth")
    assert not (earlier_samples / "evaluation.json").exists()


def test_negative_misread_count(earlier_samples, tmp_path):
    code, _, err = run_main("evaluate.py", "--samples", earlier_samples / "test", "--misread", -1,
                            "--json", tmp_path / "e.json")
    assert code == 2 and last_line(err).endswith("error: --misread must be 0 or more"), err
    assert not (tmp_path / "e.json").exists()


@pytest.fixture
def resumable_run(tiny_run, tmp_path):
    """A copy of a finished run, to be resumed with broken data; it must stay exactly as it is."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out, snapshot(out)


def broken_copy(synthetic_data, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    damage(data / "iclevr" / "SYNTH_train_000002_1.png")
    return data


DATA_DAMAGE = {
    "missing image": (lambda p: p.unlink(), "1 image(s) could not be read: SYNTH_train_000002_1.png (missing)"),
    "corrupt png": (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
                    "1 image(s) could not be read: SYNTH_train_000002_1.png (OSError: "),
    "not an image": (lambda p: p.write_text("hello"),
                     "1 image(s) could not be read: SYNTH_train_000002_1.png (not a readable image)"),
}


@pytest.mark.parametrize("case", DATA_DAMAGE)
def test_broken_images_stop_training_before_it_writes(case, synthetic_data, resumable_run, tmp_path):
    damage, message = DATA_DAMAGE[case]
    out, before = resumable_run
    data = broken_copy(synthetic_data, tmp_path, damage)
    code, _, err = run_main("train.py", "--data-dir", data, "--out", out, "--preset", "tiny", "--max-steps", 30,
                            "--resume", "latest")
    assert code == 2 and last_line(err).startswith(f"error: {data}/iclevr: {message}"), err
    assert snapshot(out) == before


def test_wrong_image_size_is_resized_with_a_warning(synthetic_data, tmp_path):
    data = broken_copy(synthetic_data, tmp_path, lambda p: Image.fromarray(
        np.full((80, 120, 3), 128, np.uint8)).save(p))
    code, _, err = run_main("train.py", "--data-dir", data, "--out", tmp_path / "run", "--preset", "tiny",
                            "--batch-size", 4, "--max-steps", 1)
    assert code == 0, err
    warning = (f"warning: 1 image(s) in {data}/iclevr were not 64x64 and were resized, e.g. "
               f"SYNTH_train_000002_1.png (120x80)")
    assert [line for line in err.splitlines() if line.strip() == warning], err


def test_missing_data_dir(tmp_path):
    code, _, err = run_main("train.py", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert (code, last_line(err)) == (2, f"error: {tmp_path}/nowhere: no such data directory (expected iclevr/, "
                                         f"train.json, objects.json; or use --data-dir synthetic for generated scenes)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_train_json(synthetic_data, resumable_run, tmp_path):
    out, before = resumable_run
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    labels = json.loads((data / "train.json").read_text())
    labels["SYNTH_train_000001_0.png"] = ["red cubes"]
    (data / "train.json").write_text(json.dumps(labels))
    code, _, err = run_main("train.py", "--data-dir", data, "--out", out, "--preset", "tiny", "--resume", "latest")
    assert code == 2 and last_line(err).startswith(
        f"error: {data}/train.json: SYNTH_train_000001_0.png: unknown label 'red cubes' (closest: 'red cube'")
    assert snapshot(out) == before


def test_existing_run_without_resume(resumable_run, synthetic_data):
    out, before = resumable_run
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", out, "--preset", "tiny")
    assert (code, last_line(err)) == (2, f"error: {out} already has checkpoints: add --resume latest to continue, "
                                         f"or pick another --out")
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def tiny_tokens_model(vocabulary, tmp_path_factory):
    import torch

    import model as model_lib

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokens") / "model"
    model_lib.ICLEVRPipeline(unet=model_lib.build_model("tiny-tokens", vocabulary.names),
                             scheduler=model_lib.training_scheduler()).save_pretrained(folder)
    return folder


def test_more_objects_than_a_token_model_draws(tiny_tokens_model, earlier_samples):
    before = snapshot(earlier_samples)
    code, _, err = run_main("sample.py", "--model", tiny_tokens_model, "--out", earlier_samples, "--sampler", "ddim",
                            "--steps", 2, "--labels", "red sphere,cyan cube,gray cube,blue cube,green cube")
    assert (code, last_line(err)) == (2, "error: condition 0: 5 labels, but this model draws at most 4 objects")
    assert snapshot(earlier_samples) == before


def test_training_images_with_more_objects_than_the_model_reads(tmp_path):
    import synthetic

    data = synthetic.generate(tmp_path / "five", scenes=3, max_objects=5, seed=0, progress=False)
    code, _, err = run_main("train.py", "--data-dir", data, "--out", tmp_path / "run", "--preset", "tiny-tokens",
                            "--batch-size", 2, "--max-steps", 1)
    assert (code, last_line(err)) == (2, "error: some training images have 5 labels, but the model reads at most 4 "
                                         "(add --model-option max_objects=5)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_sampling_settings_file(tiny_tokens_model, earlier_samples, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_tokens_model, model)
    (model / "sampling.json").write_text('{"sampler": "ddim", "steps": "many"}')
    before = snapshot(earlier_samples)
    code, _, err = run_main("sample.py", "--model", model, "--out", earlier_samples, "--labels", "red sphere")
    assert (code, last_line(err)) == (2, f'error: {model}/sampling.json: expected {{"sampler": name, "steps": '
                                         f'integer, "guidance_scale": number, "guidance_max_t": integer, '
                                         f'"precision": "fp32" or "bf16", "guidance_by_objects": {{"K": '
                                         f'{{"guidance_scale": number, "guidance_max_t": integer}}}}, "joint_weight": '
                                         f'number}} (each optional)')
    (model / "sampling.json").write_text('{"sampler": "ddim", "steps": 2, "guidance_by_objects": {"4": 2}}')
    code, _, err = run_main("sample.py", "--model", model, "--out", earlier_samples, "--labels", "red sphere")
    assert (code, last_line(err)) == (2, f'error: {model}/sampling.json: guidance_by_objects["4"]: expected '
                                         f'{{"guidance_scale": number, "guidance_max_t": integer}} for requests of a '
                                         f'number of labels (guidance_max_t optional: every step)')
    (model / "sampling.json").write_text('{"sampler": "ddim", "steps": 2, "guidance_by_objects": '
                                         '{"4": {"guidance_scale": 30}}}')
    code, _, err = run_main("sample.py", "--model", model, "--out", earlier_samples, "--labels", "red sphere")
    assert (code, last_line(err)) == (2, "error: --guidance-by-objects 4:30: K must be between 1 and 6, SCALE "
                                         "between 0 and 20, MAX_T between 0 and 1000")
    (model / "sampling.json").write_text('{"sampler": "ddim", "steps": 2, "precision": "fp16"}')
    code, _, err = run_main("sample.py", "--model", model, "--out", earlier_samples, "--labels", "red sphere")
    assert (code, last_line(err)) == (2, "error: unknown precision 'fp16' (choose from fp32, bf16)")
    (model / "sampling.json").write_text('{"sampler": "ddim", "steps": 2, "guidance_scale": 50}')
    code, _, err = run_main("sample.py", "--model", model, "--out", earlier_samples, "--labels", "red sphere")
    assert (code, last_line(err)) == (2, "error: --guidance-scale must be between 0 and 20 (got 50; 1 means no "
                                         "guidance)")
    assert snapshot(earlier_samples) == before


def test_unknown_model_class(synthetic_data, tmp_path):
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "run", "--preset", "tiny",
                            "--model-option", "model=Transformer")
    assert (code, last_line(err)) == (2, "error: unknown model class 'Transformer' (choose from ConditionalUNet, "
                                         "ObjectTokenUNet)")
