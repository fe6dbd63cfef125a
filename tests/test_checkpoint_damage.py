"""Checkpoints that verify themselves: every file of the newest checkpoint truncated, flipped, deleted or garbled
in turn; resume falls back to the intact one before it and ends with the weights of a run that never saw the
damage, bit for bit; nothing intact is one line and a non-zero exit."""
import json
import shutil

import pytest
from safetensors.torch import load_file

from conftest import last_line, run_main

# a constant rate: the run to step 4 and its continuation to 6 follow the same schedule as one run to 6
TINY = ["--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--lr-schedule", "constant", "--meter-every", "0",
        "--keep", "5"]
DAMAGES = ("truncate", "flip", "delete", "garble")


def train(data, out, steps, every=2):
    return run_main("train.py", "--data-dir", data, "--out", out, *TINY, "--max-steps", steps,
                    "--checkpoint-every", every, "--resume", "latest")


def damage(path, how):
    content = path.read_bytes()
    if how == "truncate":
        path.write_bytes(content[:len(content) // 2])
    elif how == "flip":
        middle = len(content) // 2
        path.write_bytes(content[:middle] + bytes([content[middle] ^ 0x01]) + content[middle + 1:])
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"{garbage")


def final_weights(run):
    return load_file(run / "checkpoints" / "step-00000006" / "model.safetensors")


@pytest.fixture(scope="module")
def damage_runs(synthetic_data, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, and the weights at step 6 of its undamaged continuation."""
    base = tmp_path_factory.mktemp("damage") / "run"
    code, _, err = train(synthetic_data, base, 4)
    assert code == 0, err
    reference = base.with_name("reference")
    shutil.copytree(base, reference)
    code, _, err = train(synthetic_data, reference, 6)
    assert code == 0, err
    return base, final_weights(reference)


def checkpoint_files(run):
    newest = run / "checkpoints" / "step-00000004"
    return sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())


def test_checkpoints_carry_a_manifest_of_every_file(damage_runs):
    base, _ = damage_runs
    names = checkpoint_files(base)
    listed = json.loads((base / "checkpoints" / "step-00000004" / "manifest.json").read_text())["files"]
    assert sorted(listed) == [n for n in names if n != "manifest.json"]
    assert {"model.safetensors", "optimizer.pt", "lr_scheduler.pt", "state.json",
            "pipeline/unet/diffusion_pytorch_model.safetensors", "pipeline/manifest.json"} <= set(listed)


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_skips_a_damaged_checkpoint_and_ends_with_the_same_weights(damage_runs, synthetic_data, tmp_path,
                                                                         how):
    base, reference = damage_runs
    for name in checkpoint_files(base):
        run = tmp_path / f"{how}-{name.replace('/', '-')}"
        shutil.copytree(base, run)
        newest = run / "checkpoints" / "step-00000004"
        damage(newest / name, how)
        code, _, err = train(synthetic_data, run, 6)
        assert code == 0, f"{how} {name}: {err}"
        warning = [line for line in err.splitlines() if line.startswith("warning:") and "damaged" in line]
        assert len(warning) == 1 and "Traceback" not in err, f"{how} {name}: {err}"
        assert warning[0].startswith(f"warning: {newest} is damaged ("), warning[0]
        assert name in warning[0] or name == "manifest.json", warning[0]  # a flipped manifest may name an entry
        assert f"resumed from {run}/checkpoints/step-00000002 at step 2" in err
        assert (run / "checkpoints" / "damaged-step-00000004").is_dir()  # kept for the user, not deleted
        weights = final_weights(run)
        assert weights.keys() == reference.keys()
        assert all((weights[k] == reference[k]).all() for k in reference), f"{how} {name}: other weights"


def test_nothing_intact_and_an_explicit_damaged_checkpoint_are_refused_in_one_line(damage_runs, synthetic_data,
                                                                                  tmp_path):
    base, _ = damage_runs
    run = tmp_path / "run"
    shutil.copytree(base, run)
    damage(run / "checkpoints" / "step-00000002" / "optimizer.pt", "flip")
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", tmp_path / "other", *TINY,
                            "--max-steps", 6, "--resume", run / "checkpoints" / "step-00000002")
    assert code == 2 and last_line(err) == (
        f"error: {run}/checkpoints/step-00000002 is damaged (optimizer.pt is not what was written (SHA-256 "
        f"differs)): resume from another checkpoint, or --resume latest for the newest intact one")
    damage(run / "checkpoints" / "step-00000004" / "model.safetensors", "truncate")
    code, _, err = train(synthetic_data, run, 6)
    assert code == 2 and last_line(err) == (f"error: {run}/checkpoints: no intact checkpoint left (2 damaged, kept "
                                            f"as damaged-step-*); start again with another --out")
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-step-00000002",
                                                                       "damaged-step-00000004"]


def test_a_run_from_before_manifests_still_resumes_with_a_note(damage_runs, synthetic_data, tmp_path):
    base, reference = damage_runs
    run = tmp_path / "old"
    shutil.copytree(base, run)
    for folder in (run / "checkpoints").iterdir():
        for manifest in folder.rglob("manifest.json"):
            manifest.unlink()
        state = json.loads((folder / "state.json").read_text())
        del state["manifest"]
        (folder / "state.json").write_text(json.dumps(state))
    code, _, err = train(synthetic_data, run, 6)
    assert code == 0, err
    newest = run / "checkpoints" / "step-00000004"
    assert f"warning: {newest} was written without a manifest (an older run): it cannot be verified" in err
    assert all((final_weights(run)[k] == reference[k]).all() for k in reference)


@pytest.mark.parametrize("script", ["sample.py", "export.py"])
def test_scripts_refuse_a_damaged_checkpoint_folder(damage_runs, tmp_path, script):
    base, _ = damage_runs
    run = tmp_path / "run"
    shutil.copytree(base, run)
    checkpoint = run / "checkpoints" / "step-00000004"
    damage(checkpoint / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors", "flip")
    args = ["--model", checkpoint, "--labels", "red cube", "--steps", 2, "--out", tmp_path / "out"] \
        if script == "sample.py" else [checkpoint, tmp_path / "exported"]
    code, _, err = run_main(script, *args)
    assert code == 2 and last_line(err) == (
        f"error: {checkpoint}/pipeline is damaged (unet/diffusion_pytorch_model.safetensors is not what was "
        f"written (SHA-256 differs))")
    assert not (tmp_path / "out").exists() and not (tmp_path / "exported").exists()


def test_a_model_card_may_be_edited_without_damaging_the_folder(damage_runs, tmp_path):
    from model import load_pipeline

    base, _ = damage_runs
    folder = tmp_path / "model"
    shutil.copytree(base / "model", folder)
    (folder / "README.md").write_text("# my model\n")
    assert load_pipeline(folder).unet is not None  # a card added after the manifest was written
    (folder / "README.md").write_text("# my model, edited\n")
    assert load_pipeline(folder).unet is not None
    damage(folder / "unet" / "config.json", "flip")
    with pytest.raises(Exception, match="is damaged"):
        load_pipeline(folder)
