import re

from conftest import run_script


def test_train_throughput_compares_against_the_plain_step_with_the_same_numbers():
    result = run_script("bench/train_throughput.py", "--presets", "tiny", "--batch-size", 4, "--warmup", 1,
                        "--repeats", 1, "--steps", 2)
    assert result.returncode == 0, result.stderr
    row = re.search(r"^tiny\s+([\d.]+)M\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)$", result.stdout, re.M)
    assert row, result.stdout
    plain, ours, ratio, loss_diff = map(float, row.groups()[1:])
    assert plain > 0 and ours > 0 and abs(ratio - ours / plain) < 0.01
    assert loss_diff < 1e-5  # our step computes the same loss as the textbook one on the same batch and noise
