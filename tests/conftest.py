"""Shared fixtures. Real-data tests read $ICLEVR_TEST_DATA (default ../shared/data beside the checkout) and
skip when it is absent; everything else runs on synthetic scenes generated here."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Keep every cache of the suite (and of the scripts it starts) out of the user's home.
os.environ.setdefault("ICLEVR_CACHE_DIR", tempfile.mkdtemp(prefix="iclevr-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs in two pytest-xdist workers (pytest.ini). Each computes with one thread, and so do the scripts
# it starts: two pools of two OpenMP threads on two cores spin against each other and run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
REAL_DATA = Path(os.environ.get("ICLEVR_TEST_DATA", REPO.parent / "shared" / "data"))


def run_main(script, *args):
    """A script's main() in this process, exactly as its command line runs it but without the interpreter's
    start-up: returns (exit code, stdout, stderr)."""
    import contextlib
    import importlib
    import io

    from cli import run_cli

    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: module.main([str(a) for a in args]))
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


def last_line(text):
    return text.strip().splitlines()[-1] if text.strip() else ""


def run_script(script, *args, timeout=600, env=None, cwd=REPO):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def real_data():
    if not (REAL_DATA / "train.json").is_file():
        pytest.skip(f"course data not found at {REAL_DATA} (set ICLEVR_TEST_DATA)")
    return REAL_DATA


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic set in the course layout: 64 scenes x 3 objects = 192 images."""
    import synthetic
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", scenes=64, seed=1, progress=False)


@pytest.fixture(scope="session")
def vocabulary():
    import dataset
    return dataset.Vocabulary.load(dataset.DEFAULT_VOCABULARY)


@pytest.fixture
def write_json(tmp_path):
    def write(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path
    return write


def fit_tiny(data_dir, beta_schedule="linear", steps=150, lr=3e-3, count=8, preset="tiny", seed=0,
             prediction_type="epsilon"):
    """Train a tiny preset on `count` images in-process; returns (model, scheduler, x0, labels, losses)
    where x0 is at the model's denoising size and losses are the fixed-noise evaluation losses before and after."""
    import torch

    import dataset
    import model as model_lib
    from training import training_loss

    data = dataset.load_training_set(data_dir)
    labels = torch.from_numpy(data.labels[:count])
    torch.manual_seed(seed)
    net = model_lib.build_model(preset, data.vocabulary.names)
    x0 = model_lib.to_sample_size(dataset.to_model_input(torch.from_numpy(data.images[:count])), net.denoising_size)
    scheduler = model_lib.training_scheduler(beta_schedule, prediction_type=prediction_type)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)

    def evaluation_loss():
        with torch.no_grad():
            return sum(training_loss(net, scheduler, x0, labels, torch.Generator().manual_seed(10_000 + i), 0).item()
                       for i in range(8)) / 8

    before = evaluation_loss()
    for step in range(steps):
        training_loss(net, scheduler, x0, labels, torch.Generator().manual_seed(step), 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.eval(), scheduler, x0, labels, (before, evaluation_loss())


def _trained_tiny_id(param):
    return "/".join(part for part in param if part != "epsilon")


@pytest.fixture(scope="session", params=[("tiny", "linear", "epsilon"), ("tiny", "cosine", "epsilon"),
                                          ("tiny-tokens", "linear", "epsilon"), ("tiny-tokens", "cosine", "epsilon"),
                                          ("tiny-tokens", "linear", "v_prediction")],
                ids=_trained_tiny_id)
def trained_tiny(request, synthetic_data):
    """Both model classes, each with both noise schedules, and the CPU recipe's v-prediction:
    (name, model, scheduler, x0, labels, losses)."""
    preset, schedule, prediction = request.param
    return (_trained_tiny_id(request.param),
            *fit_tiny(synthetic_data, schedule, preset=preset, prediction_type=prediction))


@pytest.fixture(scope="session")
def tiny_run(synthetic_data, tmp_path_factory):
    """A 20-step tiny-preset run on the synthetic set (its model/ is what sample/evaluate tests use)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_script("train.py", "--data-dir", synthetic_data, "--out", out, "--preset", "tiny", "--batch-size", 8,
                        "--log-every", 1, "--warmup-steps", 2, "--max-steps", 20, "--checkpoint-every", 10,
                        "--keep", 1)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def synthetic_evaluator(tmp_path_factory):
    """A course-format evaluator trained for about a minute on 300 synthetic scenes; returns (checkpoint,
    stdout). Measured: 0.35 held-out accuracy, where chance is about 0.08."""
    import synthetic
    root = tmp_path_factory.mktemp("evaluator")
    data = synthetic.generate(root / "data", scenes=300, seed=5, progress=False)
    result = run_script("evaluator.py", "train", "--data-dir", data, "--out", root / "checkpoint.pth", "--epochs", 4,
                        "--batch-size", 32, "--held-out", 0.25)
    assert result.returncode == 0, result.stderr
    return root / "checkpoint.pth", result.stdout
