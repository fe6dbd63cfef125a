import colorsys
import json

import numpy as np
import pytest
from PIL import Image

import synthetic
from conftest import last_line, run_main
from cli import UserError


def read(folder, name):
    return np.asarray(Image.open(folder / "iclevr" / name))


def test_same_seed_same_images(synthetic_data, tmp_path):
    again = synthetic.generate(tmp_path / "again", scenes=64, seed=1, progress=False)
    other = synthetic.generate(tmp_path / "other", scenes=4, seed=2, progress=False)
    assert (again / "train.json").read_text() == (synthetic_data / "train.json").read_text()
    for name in json.loads((again / "train.json").read_text()):
        assert np.array_equal(read(again, name), read(synthetic_data, name))
    assert not np.array_equal(read(other, "SYNTH_train_000000_0.png"), read(synthetic_data, "SYNTH_train_000000_0.png"))


def test_course_layout(synthetic_data, vocabulary):
    labels = json.loads((synthetic_data / "train.json").read_text())
    assert len(labels) == 64 * 3
    assert json.loads((synthetic_data / "objects.json").read_text()) == vocabulary.index_of
    for scene in range(64):  # one object added per image, no label twice
        a, b, c = (labels[f"SYNTH_train_{scene:06d}_{k}.png"] for k in range(3))
        assert b[:1] == a and c[:2] == b and len(set(c)) == 3
    for name in ("test.json", "new_test.json"):
        sets = json.loads((synthetic_data / name).read_text())
        assert len(sets) == 32 and all(1 <= len(s) <= 3 and len(set(s)) == len(s) for s in sets)
    image = Image.open(synthetic_data / "iclevr" / "SYNTH_train_000000_0.png")
    assert image.size == (64, 64) and image.mode == "RGB"


def hue_counts(image):
    """Pixels per CLEVR colour, by hue among clearly saturated pixels (gray has no hue to tell)."""
    pixels = image.reshape(-1, 3) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
    saturated = (hsv[:, 1] > 0.45) & (hsv[:, 2] > 0.12)
    counts = {}
    for colour, rgb in synthetic.COLOURS.items():
        if colour == "gray":
            continue
        hue = colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0]
        distance = np.abs((hsv[:, 0] - hue + 0.5) % 1.0 - 0.5)
        counts[colour] = int((saturated & (distance < 0.035)).sum())
    return counts


def test_the_colours_drawn_are_the_labels(synthetic_data):
    labels = json.loads((synthetic_data / "train.json").read_text())
    for name in sorted(labels)[:60]:
        colours = {label.split()[0] for label in labels[name]}
        counts = hue_counts(read(synthetic_data, name))
        for colour, count in counts.items():
            if colour in colours:
                assert count >= 6, f"{name}: {colour} is in {labels[name]} but has {count} pixels"
            else:
                assert count <= 2, f"{name}: {count} {colour} pixels, labels {labels[name]}"


@pytest.mark.parametrize("objects", [1, 2, 5])
def test_one_to_five_objects(objects, tmp_path, vocabulary):
    out = synthetic.generate(tmp_path / "d", scenes=3, max_objects=objects, seed=0, progress=False)
    labels = json.loads((out / "train.json").read_text())
    assert len(labels) == 3 * objects
    assert max(len(v) for v in labels.values()) == objects
    assert all(len(set(v)) == len(v) for v in labels.values())


@pytest.mark.parametrize("args, message", [
    (["--max-objects", "0"], "error: --max-objects must be at least 1 (got 0)"),
    (["--max-objects", "25"], "error: --max-objects 25 is more than the 24 labels (labels do not repeat within a "
                              "scene)"),
    (["--labels", "red sphere,pink cube"], "error: --labels: unknown label 'pink cube'"),
    (["--scenes", "0"], "error: --scenes must be at least 1 (got 0)"),
])
def test_bad_arguments(args, message, tmp_path):
    code, _, err = run_main("synthetic.py", "--out", tmp_path / "d", "--out-image", tmp_path / "x.png", *args)
    assert code == 2 and last_line(err).startswith(message), err
    assert not (tmp_path / "d").exists()


def test_existing_output_is_not_overwritten(synthetic_data):
    with pytest.raises(UserError, match="already exists"):
        synthetic.generate(synthetic_data, scenes=1, progress=False)


def test_labels_draw_one_picture(tmp_path):
    code, out, err = run_main("synthetic.py", "--labels", "red sphere,cyan cube,yellow cylinder",
                              "--out-image", tmp_path / "scene.png")
    assert code == 0, err
    counts = hue_counts(np.asarray(Image.open(tmp_path / "scene.png")))
    assert counts["red"] >= 6 and counts["cyan"] >= 6 and counts["yellow"] >= 6 and counts["blue"] <= 2


def test_train_py_generates_and_caches_a_synthetic_set(tmp_path, monkeypatch):
    """--data-dir synthetic makes (once) and uses a generated set; a named data dir is never replaced by one."""
    monkeypatch.setattr(synthetic, "DEFAULT_SCENES", 8)
    args = ["--data-dir", "synthetic", "--cache-dir", tmp_path / "cache", "--preset", "tiny", "--batch-size", 4,
            "--max-steps", 1]
    code, out, err = run_main("train.py", *args, "--out", tmp_path / "run")
    assert code == 0, err
    made = tmp_path / "cache" / "synthetic-8x3-seed0"
    assert len(json.loads((made / "train.json").read_text())) == 24 and "generating 8 synthetic scenes" in out
    stamp = (made / "train.json").stat().st_mtime_ns
    code, out, err = run_main("train.py", *args, "--out", tmp_path / "run2")
    assert code == 0 and "generating" not in out and (made / "train.json").stat().st_mtime_ns == stamp
    code, _, err = run_main("train.py", "--data-dir", tmp_path / "no-such-dir", "--out", tmp_path / "run3")
    assert code == 2 and "no such data directory" in last_line(err)
    assert not (tmp_path / "no-such-dir").exists()
