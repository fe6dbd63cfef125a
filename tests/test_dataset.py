import json

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from cli import UserError


def test_project_vocabulary_is_the_course_order(vocabulary):
    assert len(vocabulary) == 24
    assert vocabulary.index_of["gray cube"] == 0
    assert vocabulary.index_of["red sphere"] == 9
    assert vocabulary.index_of["yellow cylinder"] == 23


def test_course_objects_json_matches_ours(real_data, vocabulary):
    assert dataset.Vocabulary.load(real_data / "objects.json").index_of == vocabulary.index_of


def test_encode_decode_round_trip(vocabulary):
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 5, 24):
        labels = [vocabulary.names[i] for i in sorted(rng.choice(24, size=k, replace=False))]
        vector = vocabulary.encode(labels)
        assert vector.shape == (24,) and vector.sum() == k
        assert vocabulary.decode(vector) == labels


def test_vocabulary_fallback_order(tmp_path, vocabulary):
    assert dataset.find_vocabulary(tmp_path).source == str(dataset.DEFAULT_VOCABULARY)
    (tmp_path / "object.json").write_text(json.dumps({"a": 0, "b": 1}))
    assert dataset.find_vocabulary(tmp_path).names == ["a", "b"]
    (tmp_path / "objects.json").write_text(json.dumps({"c": 0}))
    assert dataset.find_vocabulary(tmp_path).names == ["c"]


def test_bad_vocabulary_indices(write_json):
    with pytest.raises(UserError, match="0..1"):
        dataset.Vocabulary.load(write_json("v.json", {"a": 0, "b": 2}))


def test_load_conditions_accepts_course_format(write_json, vocabulary):
    path = write_json("c.json", [["red sphere"], ["cyan cube", "gray cylinder", "yellow sphere"]])
    assert dataset.load_conditions(path, vocabulary)[1] == ["cyan cube", "gray cylinder", "yellow sphere"]


@pytest.mark.parametrize("content, message", [
    ([["red sphere"], ["redd sphere"]], r"c\.json: entry 1: unknown label 'redd sphere' \(closest: 'red sphere'"),
    ([["red sphere"], []], r"c\.json: entry 1: empty label list"),
    ([["red cube", "blue cube", "red cube"]], r"c\.json: entry 0: label 'red cube' appears twice"),
    ([["red cube"], "blue cube"], r"c\.json: entry 1: expected a list of label names"),
    ([["red cube", 3]], r"c\.json: entry 0: expected a list of label names"),
    ({"a": ["red cube"]}, r"c\.json: expected a non-empty JSON list of label lists"),
    ([], r"c\.json: expected a non-empty JSON list"),
    ('[["red cube"],', r"c\.json: not valid JSON \(line 1"),
])
def test_condition_file_errors_name_file_and_entry(write_json, vocabulary, content, message):
    with pytest.raises(UserError, match=message):
        dataset.load_conditions(write_json("c.json", content), vocabulary)


def test_missing_condition_file(tmp_path, vocabulary):
    with pytest.raises(UserError, match="no such condition file"):
        dataset.load_conditions(tmp_path / "nope.json", vocabulary)


def test_label_string(vocabulary):
    assert dataset.parse_label_string("red sphere, cyan cube", vocabulary) == ["red sphere", "cyan cube"]
    with pytest.raises(UserError, match="--labels: unknown label 'pink cube'"):
        dataset.parse_label_string("red sphere,pink cube", vocabulary)


def test_random_conditions_follow_the_mix(vocabulary):
    sets = dataset.random_conditions(3000, vocabulary, {1: 0.2, 2: 0.3, 3: 0.5}, seed=4)
    mix = dataset.object_count_mix(sets)
    assert abs(mix[1] - 0.2) < 0.03 and abs(mix[3] - 0.5) < 0.03
    assert all(len(set(s)) == len(s) for s in sets)
    assert sets == dataset.random_conditions(3000, vocabulary, {1: 0.2, 2: 0.3, 3: 0.5}, seed=4)


def test_split_keeps_scenes_together():
    names = [f"CLEVR_train_{s:06d}_{k}.png" for s in range(300) for k in range(3)]
    train, held = dataset.split_by_scene(names, 0.2)
    assert 0.1 < len(held) / len(names) < 0.3
    held_scenes = {dataset.scene_of(names[i]) for i in held}
    assert not held_scenes & {dataset.scene_of(names[i]) for i in train}
    assert len(held) == 3 * len(held_scenes)


def test_batches_cover_each_epoch_and_split_across_processes():
    n, batch = 100, 8
    epoch = torch.cat([dataset.batch_indices(n, batch, seed=1, step=s) for s in range(n // batch)])
    assert len(set(epoch.tolist())) == len(epoch) == 96
    ranks = [dataset.batch_indices(n, batch, 1, step=3, rank=r, world_size=2) for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert not torch.equal(dataset.batch_indices(n, batch, 1, 0), dataset.batch_indices(n, batch, 1, 12))


def make_course_dir(root, count=6, size=64):
    (root / "iclevr").mkdir(parents=True)
    labels = {}
    for i in range(count):
        name = f"CLEVR_train_{i // 3:06d}_{i % 3}.png"
        Image.fromarray(np.full((size, size, 3), 10 * i, np.uint8)).save(root / "iclevr" / name)
        labels[name] = ["red cube", "blue sphere", "cyan cylinder"][: i % 3 + 1]
    (root / "train.json").write_text(json.dumps(labels))
    return root


def test_training_set_loads_and_caches(tmp_path):
    root = make_course_dir(tmp_path / "data")
    data = dataset.load_training_set(root, cache_dir=tmp_path / "cache")
    assert data.images.shape == (6, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.images[4, 0, 0, 0] == 40 and data.label_lists[4] == ["red cube", "blue sphere"]
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 1
    # a changed image changes the key: the cache is rebuilt, not reused
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "iclevr" / "CLEVR_train_000001_1.png")
    data = dataset.load_training_set(root, cache_dir=tmp_path / "cache")
    assert data.images[4, 0, 0, 0] == 200
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 2


def test_missing_and_corrupt_images_are_named(tmp_path):
    root = make_course_dir(tmp_path / "data")
    (root / "iclevr" / "CLEVR_train_000000_1.png").unlink()
    (root / "iclevr" / "CLEVR_train_000001_0.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"2 image\(s\) could not be read: CLEVR_train_000000_1.png \(missing\), "
                                        r"CLEVR_train_000001_0.png \(not a readable image\)"):
        dataset.load_training_set(root, cache_dir=tmp_path / "cache")


def test_wrong_size_images_are_resized_with_a_warning(tmp_path, capsys):
    root = make_course_dir(tmp_path / "data", size=64)
    Image.fromarray(np.full((80, 120, 3), 77, np.uint8)).save(root / "iclevr" / "CLEVR_train_000000_2.png")
    data = dataset.load_training_set(root, cache_dir=tmp_path / "cache")
    assert (f"warning: 1 image(s) in {root}/iclevr were not 64x64 and were resized, e.g. "
            f"CLEVR_train_000000_2.png (120x80)") in capsys.readouterr().err
    assert data.images.shape == (6, 64, 64, 3) and data.images[2].mean() == pytest.approx(77, abs=1)


def test_missing_data_dir_and_bad_train_json(tmp_path):
    with pytest.raises(UserError, match="no such data directory"):
        dataset.load_training_set(tmp_path / "absent", cache_dir=tmp_path)
    root = make_course_dir(tmp_path / "data")
    (root / "train.json").write_text(json.dumps({"CLEVR_train_000000_0.png": ["red cub"]}))
    with pytest.raises(UserError, match=r"train.json: CLEVR_train_000000_0.png: unknown label 'red cub'"):
        dataset.load_training_set(root, cache_dir=tmp_path)


def test_model_input_range_and_flip():
    images = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    x = dataset.to_model_input(images, torch.tensor([True, False, False, True]))
    assert x.shape == (4, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(dataset.to_uint8(x[1:3]), images[1:3].numpy())
    assert np.array_equal(dataset.to_uint8(x[:1]), images[:1].flip(2).numpy())


def test_real_training_set(real_data, tmp_path_factory):
    data = dataset.load_training_set(real_data, cache_dir=tmp_path_factory.mktemp("cache"))
    assert len(data) == 18009 and data.images.shape == (18009, 64, 64, 3)
    assert set(data.labels.sum(1).tolist()) == {1.0, 2.0, 3.0}
    for name in ("test.json", "new_test.json"):
        assert len(dataset.load_conditions(real_data / name, data.vocabulary)) == 32


def test_meter_scenes_are_whole_scenes_inside_the_evaluator_held_out_split():
    import dataset

    names = [f"CLEVR_train_{scene:06d}_{k}.png" for scene in range(600) for k in range(3)]
    kept, held = dataset.split_off_scenes(names, 20)
    held_scenes = {dataset.scene_of(names[i]) for i in held}
    assert 20 <= len(held) < 23 and len(held) == 3 * len(held_scenes)  # whole triples only
    assert sorted([*kept, *held]) == list(range(len(names)))
    evaluator_held = set(dataset.split_by_scene(names, 0.1, seed=0)[1])
    assert set(held) <= evaluator_held
    assert len(dataset.split_off_scenes(names, 0)[1]) == 0


def test_a_data_folder_may_hold_its_images_packed(synthetic_data, tmp_path):
    """iclevr.npz in place of iclevr/ (bench/gpu_bundle.py): read like any data folder, in train.json's order."""
    import shutil

    data = dataset.load_training_set(synthetic_data)
    folder = tmp_path / "packed"
    folder.mkdir()
    for name in ("train.json", "objects.json"):
        shutil.copy(synthetic_data / name, folder / name)
    small = data.images[:, ::2, ::2]  # any size: the pack holds what the preset denoises at
    order = np.random.default_rng(0).permutation(len(data))
    dataset.write_pack(folder / dataset.PACK, [data.filenames[i] for i in order], small[order])
    packed = dataset.load_training_set(folder)
    assert packed.filenames == data.filenames and np.array_equal(packed.images, small)
    assert np.array_equal(packed.labels, data.labels)
    mapping = json.loads((folder / "train.json").read_text())
    mapping["CLEVR_train_999999_0.png"] = ["red cube"]
    (folder / "train.json").write_text(json.dumps(mapping))
    with pytest.raises(UserError, match=r"iclevr.npz: 1 image\(s\) of train.json are not in it, e.g. "
                                        r"CLEVR_train_999999_0.png"):
        dataset.load_training_set(folder)


def test_a_jpeg_pack_decodes_each_image_as_its_own_jpeg_file_would(synthetic_data, tmp_path, monkeypatch):
    """The 64-pixel pack (gpu_bundle.py): JPEG strips of images side by side, here 3 to a strip so that strips end
    mid-set; every image decodes to the pixels of its own JPEG file, and the folder reads like any data folder."""
    import io
    import shutil

    data = dataset.load_training_set(synthetic_data)
    monkeypatch.setattr(dataset, "JPEG_MAX_WIDTH", 3 * 64 + 10)
    folder = tmp_path / "packed"
    folder.mkdir()
    for name in ("train.json", "objects.json"):
        shutil.copy(synthetic_data / name, folder / name)
    dataset.write_pack(folder / dataset.PACK, data.filenames, data.images, jpeg_quality=90)
    packed = dataset.load_training_set(folder)
    assert packed.filenames == data.filenames and packed.images.shape == data.images.shape
    for i in (0, 2, 3, len(data) - 1):  # first, last and first of a strip; the last strip is short
        own = io.BytesIO()
        Image.fromarray(data.images[i]).save(own, "JPEG", quality=90, subsampling=0)
        assert np.array_equal(packed.images[i], np.asarray(Image.open(own)))
    assert not np.array_equal(packed.images, data.images)  # lossy, as it says
    assert np.abs(packed.images.astype(int) - data.images).mean() < 3


def test_composite_scenes_paste_one_new_object_into_a_largest_scene(synthetic_data):
    """Each composite is a 3-object training image, unchanged but for one pasted patch, with a fourth label it did
    not have; the same seed gives the same composites."""
    data = dataset.load_training_set(synthetic_data)
    composites = dataset.composite_scenes(data, 12, seed=0)
    assert composites.images.shape == (12, 64, 64, 3) and composites.labels.sum(1).tolist() == [4.0] * 12
    bases = np.flatnonzero(data.labels.sum(1) == 3)
    for image, labels in zip(composites.images, composites.label_lists):
        same = (data.images[bases] == image).all(-1).mean((1, 2))
        base = bases[same.argmax()]
        assert 0.8 < same.max() < 1.0  # a local paste, not a copy and not a blend of whole images
        assert labels[:3] == data.label_lists[base] and labels[3] not in labels[:3]
    again = dataset.composite_scenes(data, 12, seed=0)
    assert np.array_equal(again.images, composites.images) and again.label_lists == composites.label_lists
    assert not np.array_equal(dataset.composite_scenes(data, 12, seed=1).images, composites.images)


def test_composite_scenes_with_several_pastes(synthetic_data):
    """--composite-pastes 3: the count is shared between 1, 2 and 3 pasted objects; a k-paste composite is a
    3-object training image with k new labels, unchanged but for local patches; the same seed gives the same."""
    data = dataset.load_training_set(synthetic_data)
    composites = dataset.composite_scenes(data, 9, seed=0, pastes=3)
    assert composites.labels.sum(1).tolist() == [4.0] * 3 + [5.0] * 3 + [6.0] * 3
    bases = np.flatnonzero(data.labels.sum(1) == 3)
    for image, labels in zip(composites.images, composites.label_lists):
        same = (data.images[bases] == image).all(-1).mean((1, 2))
        base = bases[same.argmax()]
        pasted = len(labels) - 3
        assert 1.0 - 0.2 * pasted < same.max() < 1.0  # a few local patches on one base image
        assert labels[:3] == data.label_lists[base] and len(set(labels)) == len(labels)
    again = dataset.composite_scenes(data, 9, seed=0, pastes=3)
    assert np.array_equal(again.images, composites.images) and again.label_lists == composites.label_lists
    for image, labels in zip(composites.images[6:], composites.label_lists[6:]):  # pasted into a 5-object one
        same = (composites.images[3:6] == image).all(-1).mean((1, 2))
        assert 0.8 < same.max() < 1.0 and composites.label_lists[3 + same.argmax()] == labels[:5]
    with pytest.raises(UserError) as error:  # 2 five-object bases on this small set: no room for a sixth
        dataset.composite_scenes(data, 6, seed=0, pastes=3)
    assert str(error.value) == ("only 0 of 2 composite scenes found a place to paste object 3 of 3 (the floor "
                                "fills up: fewer --composite-pastes or more --composite-scenes)")


def test_composite_shares_weigh_the_counts_of_pasted_objects(synthetic_data):
    """--composite-shares 2 1: twice as many 4-object composites as 5-object ones; even weights split as before."""
    assert dataset.shared_out(15000, [3, 1, 1]) == [9000, 3000, 3000]
    assert dataset.shared_out(10, [1, 1, 1]) == [4, 3, 3] and dataset.shared_out(7, [1]) == [7]
    data = dataset.load_training_set(synthetic_data)
    composites = dataset.composite_scenes(data, 9, seed=0, pastes=2, shares=[2, 1])
    assert composites.labels.sum(1).tolist() == [4.0] * 6 + [5.0] * 3
    even = dataset.composite_scenes(data, 8, seed=0, pastes=2)
    assert np.array_equal(even.images, dataset.composite_scenes(data, 8, seed=0, pastes=2, shares=[5, 5]).images)


def test_real_composite_scenes(real_data, tmp_path_factory):
    data = dataset.load_training_set(real_data, cache_dir=tmp_path_factory.mktemp("cache"))
    composites = dataset.composite_scenes(data, 64, seed=0)
    assert all(len(set(labels)) == 4 for labels in composites.label_lists)
