"""More objects than training showed: requests above the model's largest training scene are drawn by composing
their sub-requests; requests within it are sampled jointly, exactly as before."""
import json

import numpy as np
import pytest
import torch

import model as model_lib
from conftest import last_line, run_main
from sampling import SamplingSettings

FOUR = ["red sphere", "cyan cube", "gray cylinder", "yellow cube"]
FIVE = ["red sphere", "cyan cube", "gray cylinder", "yellow cube", "blue sphere"]
WITHIN = [["red sphere"], ["cyan cube", "blue cylinder"], ["gray cube", "green sphere", "purple cylinder"]]


@pytest.fixture(scope="module")
def composing_pipe(vocabulary):
    """An (untrained) tiny object-token model that was 'trained' on scenes of at most 3 objects."""
    torch.manual_seed(0)
    unet = model_lib.build_model("tiny-tokens", vocabulary.names, trained_objects=3)
    pipe = model_lib.ICLEVRPipeline(unet=unet, scheduler=model_lib.sampling_scheduler(
        model_lib.training_scheduler(prediction_type="v_prediction").config, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, conditions, seed=0, compose_above="auto", **settings):
    """DDIM 3 steps, guidance 3 below t=500, with other `settings` (SamplingSettings' fields)."""
    return pipe(conditions, SamplingSettings("ddim", 3, 3.0, 500, **settings), output_type="np",
                generator=torch.Generator().manual_seed(seed), compose_above=compose_above).images


def test_sub_requests_are_the_subsets_of_the_trained_size(composing_pipe, vocabulary):
    labels = vocabulary.encode_all([FOUR, WITHIN[1]])
    rows, owner, weights = composing_pipe.sub_requests(labels, 3)
    assert owner.tolist() == [0, 0, 0, 0, 1]
    assert rows.sum(1).tolist() == [3, 3, 3, 3, 2]
    assert torch.equal(rows[:4].sum(0), 3 * labels[0])  # each of the 4 labels in 3 of the 4 subsets
    assert torch.equal(rows[4], labels[1])
    assert weights.tolist() == [0.25, 0.25, 0.25, 0.25, 1.0]  # the mean of the subsets; a joint request alone
    assert len(composing_pipe.sub_requests(vocabulary.encode_all([FIVE]), 3)[0]) == 10  # C(5, 3)


def test_the_joint_weight_adds_the_request_read_as_whole_as_the_model_reads(composing_pipe, vocabulary):
    rows, owner, weights = composing_pipe.sub_requests(vocabulary.encode_all([FOUR, WITHIN[1]]), 3, 0.2)
    assert owner.tolist() == [0, 0, 0, 0, 0, 1]
    assert torch.equal(rows[4], vocabulary.encode_all([FOUR])[0])  # 4 object tokens: the whole request
    assert torch.allclose(weights, torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2, 1.0]))
    rows, owner, weights = composing_pipe.sub_requests(vocabulary.encode_all([FIVE]), 3, 0.5)
    assert rows.sum(1).tolist() == [3] * 10 + [4] * 5  # 5 labels: its 4-label subsets, the most tokens read
    assert torch.allclose(weights, torch.tensor([0.05] * 10 + [0.1] * 5))


def test_four_and_five_objects_are_drawn_deterministically_and_follow_their_labels(composing_pipe):
    images = draw(composing_pipe, [FOUR, FIVE])
    assert images.shape == (2, 64, 64, 3)
    assert np.array_equal(images, draw(composing_pipe, [FOUR, FIVE]))  # same seed, same images
    other = draw(composing_pipe, [["blue cube", "green cylinder", "brown sphere", "purple cube"], FIVE])
    assert not np.array_equal(images[0], other[0]) and np.array_equal(images[1], other[1])


def test_requests_within_the_training_range_are_exactly_todays_joint_samples(composing_pipe):
    composed = draw(composing_pipe, WITHIN)
    assert np.array_equal(composed, draw(composing_pipe, WITHIN, compose_above=None))
    assert np.array_equal(composed, draw(composing_pipe, WITHIN, compose_above=4))
    mixed = draw(composing_pipe, [*WITHIN, FOUR, FIVE])  # one batch of requests of 1 to 5 objects
    assert mixed.shape == (5, 64, 64, 3)


def test_composition_can_be_switched_off_or_forced(composing_pipe):
    with pytest.raises(model_lib.UserError, match="5 labels, but this model draws at most 4 objects$"):
        draw(composing_pipe, [FIVE], compose_above=None)
    forced = draw(composing_pipe, WITHIN, compose_above=2)  # 3-object requests from their pairs
    # the others keep their own rows; the UNet's batch differs, so equal up to float rounding (bit for bit on an
    # AMX CPU, one grey level on an AVX2-only one)
    assert np.abs(forced[:2].astype(int) - draw(composing_pipe, WITHIN)[:2]).max() <= 1
    assert not np.array_equal(forced[2], draw(composing_pipe, WITHIN)[2])


def test_a_guidance_per_object_count_changes_only_those_requests(composing_pipe):
    both = [*WITHIN, FOUR]
    common = draw(composing_pipe, both)
    own = draw(composing_pipe, both, guidance_by_objects={4: (2.0, None)})  # every step, at scale 2
    assert not np.array_equal(own[3], common[3])
    assert np.array_equal(own[3], draw(composing_pipe, both, guidance_by_objects={4: (2.0, None), 5: (9.0, 100)})[3])
    # the other requests keep the common guidance (the UNet's batch differs, so to float rounding only)
    assert np.abs(own[:3].astype(int) - common[:3]).max() <= 1
    same = draw(composing_pipe, both, guidance_by_objects={4: (3.0, 500)})  # the common setting, spelled out
    assert np.array_equal(same, common)


def test_the_joint_weight_changes_composed_requests_only(composing_pipe):
    both = [*WITHIN, FOUR, FIVE]
    alone, mixed = draw(composing_pipe, both), draw(composing_pipe, both, joint_weight=0.25)
    assert np.array_equal(mixed[:3], alone[:3])  # joint requests: their own rows, bit for bit
    assert not np.array_equal(mixed[3], alone[3]) and not np.array_equal(mixed[4], alone[4])
    assert np.array_equal(mixed, draw(composing_pipe, both, joint_weight=0.25))


def test_sampling_json_carries_the_joint_weight(composing_pipe, tmp_path):
    composing_pipe.save_pretrained(tmp_path / "model")
    code, _, err = run_main("export.py", tmp_path / "model", tmp_path / "shipped", "--steps", 2,
                            "--guidance-scale", 3, "--joint-weight", 0.25)
    assert code == 0, err
    assert json.loads((tmp_path / "shipped" / "sampling.json").read_text())["joint_weight"] == 0.25
    code, _, err = run_main("sample.py", "--model", tmp_path / "shipped", "--out", tmp_path / "out",
                            "--labels", ",".join(FOUR))
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "labels" / "conditions.json").read_text())["joint_weight"] == 0.25
    code, _, err = run_main("sample.py", "--model", tmp_path / "shipped", "--out", tmp_path / "off",
                            "--labels", ",".join(FOUR), "--joint-weight", 0)
    assert code == 0, err
    assert "joint_weight" not in json.loads((tmp_path / "off" / "labels" / "conditions.json").read_text())
    code, _, err = run_main("sample.py", "--model", tmp_path / "shipped", "--out", tmp_path / "bad",
                            "--labels", ",".join(FOUR), "--joint-weight", 1.5)
    assert (code, last_line(err)) == (2, "error: --joint-weight must be between 0 and 1 (got 1.5; 0: composition "
                                         "alone)")
    assert not (tmp_path / "bad").exists()


def test_sampling_json_carries_the_guidance_per_object_count(composing_pipe, tmp_path):
    composing_pipe.save_pretrained(tmp_path / "model")
    code, out, err = run_main("export.py", tmp_path / "model", tmp_path / "shipped", "--steps", 2,
                              "--guidance-scale", 3, "--guidance-max-t", 500, "--guidance-by-objects", "5:1.5", "4:2")
    assert code == 0, err
    assert "guidance 3 below t=500; 4 objects: guidance 2; 5 objects: guidance 1.5" in out
    stored = json.loads((tmp_path / "shipped" / "sampling.json").read_text())
    assert stored["guidance_by_objects"] == {"4": {"guidance_scale": 2.0}, "5": {"guidance_scale": 1.5}}
    code, _, err = run_main("sample.py", "--model", tmp_path / "shipped", "--out", tmp_path / "out",
                            "--labels", ",".join(FOUR))
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "labels" / "conditions.json").read_text())
    assert record["guidance_by_objects"] == stored["guidance_by_objects"]
    code, _, err = run_main("sample.py", "--model", tmp_path / "shipped", "--out", tmp_path / "flag",
                            "--labels", ",".join(FOUR), "--guidance-by-objects", "4:2.5:800")
    assert code == 0, err
    record = json.loads((tmp_path / "flag" / "labels" / "conditions.json").read_text())
    assert record["guidance_by_objects"] == {"4": {"guidance_scale": 2.5, "guidance_max_t": 800}}
    for bad, message in [("4", "--guidance-by-objects 4: expected K:SCALE or K:SCALE:MAX_T, e.g. 4:2 (requests of "
                                "4 labels at guidance 2 on every step)"),
                         ("9:2", "--guidance-by-objects 9:2: K must be between 1 and 6, SCALE between 0 and 20, "
                                 "MAX_T between 0 and 1000")]:
        code, _, err = run_main("sample.py", "--model", tmp_path / "shipped", "--out", tmp_path / "bad",
                                "--labels", "red sphere", "--guidance-by-objects", bad)
        assert (code, last_line(err)) == (2, f"error: {message}")
    assert not (tmp_path / "bad").exists()


def test_more_objects_than_composition_serves_is_one_line(composing_pipe, tmp_path):
    composing_pipe.save_pretrained(tmp_path / "model")
    seven = "red sphere,cyan cube,gray cylinder,yellow cube,blue sphere,green cube,brown cylinder"
    code, _, err = run_main("sample.py", "--model", tmp_path / "model", "--out", tmp_path / "out", "--steps", 2,
                            "--labels", seven)
    assert (code, last_line(err)) == (2, "error: condition 0: 7 labels, but this model draws at most 6 objects "
                                         "(3 jointly, more by composing 3-object sub-requests)")
    code, out, err = run_main("sample.py", "--model", tmp_path / "model", "--out", tmp_path / "out", "--steps", 2,
                              "--labels", ",".join(FIVE))
    assert code == 0, err
    code, _, err = run_main("sample.py", "--model", tmp_path / "model", "--out", tmp_path / "off", "--steps", 2,
                            "--labels", ",".join(FIVE), "--compose-above", 0)
    assert (code, last_line(err)) == (2, "error: condition 0: 5 labels, but this model draws at most 4 objects")
    assert not (tmp_path / "off").exists()


def test_trained_models_know_their_largest_scene(tiny_run):
    assert model_lib.load_pipeline(tiny_run / "model").unet.config.trained_objects == 3


def test_object_condition_sets_take_each_object_from_another_scene(vocabulary):
    import dataset

    filenames = [f"CLEVR_train_{s:06d}_{k}.png" for s in range(6) for k in range(3)]
    objects = [["red cube", "blue cube", "gray sphere"], ["green cube", "cyan sphere", "red sphere"],
               ["brown cylinder", "yellow cube", "gray cube"], ["purple sphere", "red cylinder", "blue sphere"],
               ["cyan cube", "green sphere", "gray cylinder"], ["yellow sphere", "brown cube", "blue cylinder"]]
    label_lists = [objects[s][:k + 1] for s in range(6) for k in range(3)]
    sets = dataset.scene_object_conditions(filenames, label_lists, 40, 5, seed=1)
    assert len(sets) == 40 and all(len(set(labels)) == 5 for labels in sets)
    scene_of = {label: s for s, labels in enumerate(objects) for label in labels}
    assert all(len({scene_of[label] for label in labels}) == 5 for labels in sets)  # 5 different scenes
    assert sets == dataset.scene_object_conditions(filenames, label_lists, 40, 5, seed=1)
    with pytest.raises(dataset.UserError, match="only 6 scenes"):
        dataset.scene_object_conditions(filenames, label_lists, 1, 7, seed=0)
