"""Training loses nothing: SIGKILL anywhere, clean stops, one writer per run, non-finite losses, foreign
checkpoints, and several processes."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, last_line, run_main, run_script

KILLS = int(os.environ.get("ICLEVR_KILLS", "6"))  # two of them while a checkpoint is written
TINY = ["--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2"]


def start_training(data, out, *args, log):
    command = [sys.executable, str(REPO / "train.py"), "--data-dir", str(data), "--out", str(out), *TINY,
               *map(str, args)]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def logged_steps(run_dir):
    """Steps with a training-loss record (meter and evaluation records aside)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def metrics_file_id(run_dir):
    """Which metrics.jsonl is there (it is replaced, not edited, when a run resumes); None before the first."""
    try:
        return (run_dir / "metrics.jsonl").stat().st_ino
    except FileNotFoundError:
        return None


def wait_for(condition, process, timeout=120, poll=0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def checkpoint_steps(run_dir):
    folder = run_dir / "checkpoints"
    return sorted(int(d.name.split("-")[1]) for d in folder.glob("step-*")) if folder.exists() else []


def assert_checkpoints_readable(run_dir):
    from model import ConditionalUNet

    for step in checkpoint_steps(run_dir):
        folder = run_dir / "checkpoints" / f"step-{step:08d}"
        assert json.loads((folder / "state.json").read_text())["step"] == step
        load_file(folder / "model.safetensors")
        torch.load(folder / "optimizer.pt", weights_only=True)
        torch.load(folder / "lr_scheduler.pt", weights_only=True)
        ConditionalUNet.from_pretrained(folder / "pipeline" / "unet")


def test_sigkill_anywhere_loses_at_most_one_interval(synthetic_data, tmp_path):
    """Kill the trainer KILLS times at random moments (every third one while a checkpoint is being
    written), resume with --resume latest each time, and check what survives. The moments are counted in
    training steps, not seconds, so that a fast machine cannot finish the run before it is killed."""
    out, interval, total = tmp_path / "run", 4, 60 + 8 * KILLS
    rng = random.Random(0)
    for kill in range(KILLS):
        resumed_from = max(checkpoint_steps(out), default=0)
        stale = metrics_file_id(out)  # a resumed run rewrites metrics.jsonl first: wait for its own steps
        process = start_training(synthetic_data, out, "--max-steps", total, "--checkpoint-every", interval,
                                 "--keep", 2, "--resume", "latest", log=tmp_path / f"life{kill}.log")
        assert wait_for(lambda: metrics_file_id(out) != stale and max(logged_steps(out), default=0) > resumed_from,
                        process), (tmp_path / f"life{kill}.log").read_text()
        if kill % 3 == 0:  # during a checkpoint write: its temporary folder exists
            wait_for(lambda: any((out / "checkpoints").glob(".tmp-step-*")), process)
        else:  # somewhere within the next two checkpoint intervals
            target = max(logged_steps(out), default=0) + rng.randrange(0, 2 * interval)
            wait_for(lambda: max(logged_steps(out), default=0) >= target, process)
            time.sleep(rng.uniform(0.0, 0.03))  # and at any point inside a step
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert_checkpoints_readable(out)
        reached, latest = max(logged_steps(out)), max(checkpoint_steps(out), default=0)
        assert reached - latest <= interval, f"kill {kill}: trained to {reached}, last checkpoint {latest}"
        assert reached < total, "the run finished before it was killed: make it longer"
    final = run_script("train.py", "--data-dir", synthetic_data, "--out", out, *TINY, "--max-steps", total,
                       "--checkpoint-every", interval, "--keep", 2, "--resume", "latest")
    assert final.returncode == 0, final.stderr
    assert checkpoint_steps(out)[-1] == total and (out / "model" / "model_index.json").exists()
    assert sorted(logged_steps(out)) == list(range(1, total + 1))  # redone steps are logged once
    assert not [p for p in out.rglob(".tmp-*")] and not [p for p in out.rglob(".old-*")]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_clean_stop_checkpoints_and_resumes(synthetic_data, tmp_path, sig, code):
    out = tmp_path / "run"
    process = start_training(synthetic_data, out, "--max-steps", 100000, "--checkpoint-every", 100000,
                             log=tmp_path / "log")
    assert wait_for(lambda: max(logged_steps(out), default=0) >= 3, process, poll=0.05)
    process.send_signal(sig)
    assert process.wait(timeout=60) == code
    message = last_line((tmp_path / "log").read_text())
    step = checkpoint_steps(out)[-1]
    assert message == (f"interrupted by {sig.name} at step {step}: checkpoint saved in {out}/checkpoints; "
                       f"continue with --resume latest")
    resumed = run_script("train.py", "--data-dir", synthetic_data, "--out", out, *TINY, "--max-steps", step + 2,
                         "--checkpoint-every", 100000, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out}/checkpoints/step-{step:08d} at step {step}" in resumed.stderr
    assert checkpoint_steps(out)[-1] == step + 2


def test_one_writer_per_run_and_stale_lock_taken_over(synthetic_data, tmp_path):
    out = tmp_path / "run"
    first = start_training(synthetic_data, out, "--max-steps", 100000, "--checkpoint-every", 2, log=tmp_path / "log")
    assert wait_for(lambda: checkpoint_steps(out), first, poll=0.05)
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", out, *TINY, "--max-steps", 5,
                            "--resume", "latest")
    assert code == 2 and last_line(err) == (f"error: {out} is in use by another train.py (pid {first.pid}); "
                                            f"wait for it or pick another --out")
    first.send_signal(signal.SIGKILL)
    first.wait()
    latest = checkpoint_steps(out)[-1]
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", out, *TINY, "--max-steps", latest + 1,
                            "--resume", "latest")
    assert code == 0, err
    assert checkpoint_steps(out)[-1] == latest + 1


@pytest.mark.parametrize("max_bad, failing_step", [(0, 2), (2, 4)])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_data, tmp_path, max_bad, failing_step):
    """--lr 1e30 blows the weights up in one step, so step 2 and every later one has a NaN loss."""
    out = tmp_path / "run"
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", out, *TINY, "--max-steps", 10,
                            "--lr", "1e30", "--warmup-steps", 0, "--checkpoint-every", 1, "--max-bad-steps", max_bad)
    assert code == 3
    assert last_line(err) == (f"error: non-finite loss (nan) in step {failing_step}; stopped without saving: "
                              f"the last good checkpoint is {out}/checkpoints/step-00000001")
    assert checkpoint_steps(out) == [1]
    weights = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model").exists()


def test_checkpoint_of_another_preset_or_vocabulary_is_refused(tiny_run, synthetic_data, tmp_path, vocabulary):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", out, "--preset", "small",
                            "--max-steps", 30, "--resume", "latest")
    assert code == 2 and last_line(err) == (
        f"error: {out}/checkpoints/step-00000020 has preset=tiny, but this run has preset=small "
        f"(use the same --preset and --model-option as the checkpoint)")
    swapped = dict(vocabulary.index_of, **{"gray cube": 1, "red cube": 0})
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    code, _, err = run_main("train.py", "--data-dir", synthetic_data, "--out", out, *TINY, "--max-steps", 30,
                            "--resume", "latest", "--vocabulary", tmp_path / "swapped.json")
    assert code == 2 and "was trained with another label vocabulary" in last_line(err)
    assert checkpoint_steps(out) == [20]


def test_two_processes_train_and_resume(synthetic_data, tmp_path):
    """accelerate launch --num_processes 2 --cpu (gloo): only the main process writes; a 2-process
    checkpoint resumes exactly."""
    def launch(out, *args):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(REPO / "train.py"), "--data-dir", str(synthetic_data), "--out", str(out), *TINY,
                   "--max-steps", "6", *map(str, args)]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)

    whole = launch(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert logged_steps(tmp_path / "whole") == [1, 2, 3, 4, 5, 6]  # one writer: each step logged once
    assert checkpoint_steps(tmp_path / "whole") == [6] and (tmp_path / "whole" / "model").is_dir()
    first = launch(tmp_path / "split", "--max-minutes", 0)
    assert first.returncode == 0, first.stderr
    rest = launch(tmp_path / "split", "--resume", "latest")
    assert rest.returncode == 0, rest.stderr

    def losses(run):
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if "loss" in r]

    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
