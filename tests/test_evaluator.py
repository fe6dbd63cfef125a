import json
import re

import pytest
import torch

import evaluator
from conftest import run_script
from cli import UserError


def scores_with(top, size=24, low=0.1):
    """A score row where the indices in `top` (first = highest) lead."""
    row = torch.full((size,), low)
    for rank, index in enumerate(top):
        row[index] = 0.9 - 0.1 * rank
    return row


def onehot(*indices):
    row = torch.zeros(24)
    row[list(indices)] = 1
    return row


@pytest.mark.parametrize("scores, labels, hits, k", [
    (scores_with([5]), onehot(5), 1, 1),                   # k=1 hit
    (scores_with([6]), onehot(5), 0, 1),                   # k=1 miss
    (scores_with([3, 7]), onehot(3, 5), 1, 2),             # k=2, one of two
    (scores_with([9, 5, 3]), onehot(3, 5, 9), 3, 3),        # k=3, all, in any order
    (scores_with([9, 5, 4, 3]), onehot(3, 5, 9), 2, 3),     # k=3, the third label only fourth
    (torch.full((24,), 0.5), onehot(0), 1, 1),             # all tied: the lowest index wins
    (torch.full((24,), 0.5), onehot(4), 0, 1),
    (scores_with([8, 3]).index_fill(0, torch.tensor([3]), 0.9), onehot(3, 10), 1, 2),  # tie at the top
])
def test_topk_hits_hand_computed(scores, labels, hits, k):
    assert evaluator.topk_hits(scores[None], labels[None]) == (hits, k)


def test_accuracy_is_pooled_over_labels_not_images():
    scores = torch.stack([scores_with([5]), scores_with([6]), scores_with([3, 7]), scores_with([9, 5, 3])])
    labels = torch.stack([onehot(5), onehot(5), onehot(3, 5), onehot(3, 5, 9)])
    assert evaluator.pooled_accuracy(scores, labels) == pytest.approx(5 / 7)


def course_compute_acc(out, onehot_labels):
    """The course's loop, for comparison on scores without ties."""
    acc = total = 0
    for i in range(out.size(0)):
        k = int(onehot_labels[i].sum().item())
        total += k
        _, outi = out[i].topk(k)
        _, li = onehot_labels[i].topk(k)
        acc += sum(1 for j in outi if j in li)
    return acc / total


def test_matches_the_course_definition_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 24, generator=generator)
    labels = torch.zeros(200, 24)
    for i in range(200):
        labels[i, torch.randperm(24, generator=generator)[: 1 + i % 3]] = 1
    ours = evaluator.pooled_accuracy(scores, labels)
    assert ours == pytest.approx(course_compute_acc(scores, labels))
    assert 0 < ours < 0.5


def test_loads_a_course_format_checkpoint(tmp_path):
    net = evaluator.resnet18_classifier()
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint.pth")
    model = evaluator.evaluation_model(tmp_path / "checkpoint.pth", device="cpu")
    images, labels = torch.rand(4, 3, 64, 64) * 2 - 1, torch.stack([onehot(1), onehot(2, 3), onehot(4), onehot(5)])
    accuracy = model.eval(images, labels)
    assert 0 <= accuracy <= 1
    with torch.no_grad():
        assert torch.allclose(model.predict(images), net.eval()(images))
    assert model.features(images).shape == (4, 512)


def test_scores_are_float32_even_inside_bf16_autocast(tmp_path):
    """In bf16 every sigmoid of a logit above ~7 is exactly 1.0 and top-k would fall back to label order: the
    evaluator scores in fp32 whatever context it is called from, so confident labels never tie."""
    net = evaluator.resnet18_classifier()
    with torch.no_grad():  # confident logits from 7 to 14, as a trained evaluator gives on clean images
        net.fc[0].weight.zero_()
        net.fc[0].bias.copy_(torch.linspace(7, 14, 24)[torch.randperm(24, generator=torch.Generator().manual_seed(0))])
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint.pth")
    model = evaluator.evaluation_model(tmp_path / "checkpoint.pth", device="cpu")
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = model.predict(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = model.predict(images)
        bf16 = net.eval()(images)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    top = plain.topk(3, dim=1).values
    assert (top[:, 0] > top[:, 1]).all() and (top[:, 1] > top[:, 2]).all()  # no ties decide the top 3
    assert (bf16 == 1.0).sum() > (plain == 1.0).sum()  # what bf16 would have done: many exact 1.0 scores


def test_an_evaluator_with_another_label_order_is_refused(tmp_path, vocabulary):
    net = evaluator.resnet18_classifier()
    swapped = [vocabulary.names[1], vocabulary.names[0], *vocabulary.names[2:]]
    torch.save({"model": net.state_dict(), "label_names": swapped}, tmp_path / "checkpoint.pth")
    model = evaluator.evaluation_model(tmp_path / "checkpoint.pth", device="cpu")
    with pytest.raises(UserError) as error:
        model.check_label_order(vocabulary, "the model")
    assert str(error.value) == (f"{tmp_path / 'checkpoint.pth'} orders its labels differently from the model "
                                f"(label 0: 'red cube' there, 'gray cube' here): use an evaluator trained with the "
                                f"same objects.json")
    torch.save({"model": net.state_dict(), "label_names": vocabulary.names}, tmp_path / "same.pth")
    evaluator.evaluation_model(tmp_path / "same.pth", device="cpu").check_label_order(vocabulary, "the model")
    model.label_names = None  # the course's checkpoint names no order: nothing to check
    model.check_label_order(vocabulary, "the model")


def test_bad_evaluator_checkpoints(tmp_path):
    with pytest.raises(UserError, match=r"not found: .*python evaluator.py train"):
        evaluator.evaluation_model(tmp_path / "missing.pth")
    torch.save({"model": {"fc.0.weight": torch.zeros(3, 3)}}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not a course-format evaluator checkpoint"):
        evaluator.evaluation_model(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a course-format evaluator checkpoint"):
        evaluator.evaluation_model(tmp_path / "junk.pth")


def test_training_on_a_small_slice_beats_chance_widely(synthetic_evaluator):
    checkpoint, stdout = synthetic_evaluator
    printed = re.search(r"held-out pooled accuracy: ([0-9.]+)", stdout).group(1)
    state = torch.load(checkpoint, weights_only=True)
    assert set(state) >= {"model", "label_names", "held_out_accuracy"}
    assert f"{state['held_out_accuracy']:.4f}" == printed  # the stored accuracy is the one reported
    # chance: k random labels out of 24 hit k/24 of the time, about 0.08 on 1-3 objects. Measured with this
    # fixture's settings and --seed 0..4 (which also moves the held-out split): 0.350, 0.265, 0.321, 0.335, 0.347;
    # seed 0 (used here) gave 0.348 on another machine of this type. 0.2 is 2.5x chance, below every seed.
    assert state["held_out_accuracy"] > 0.2, stdout
    evaluator.evaluation_model(checkpoint, device="cpu")  # loads in the course's format


def test_robustness_report(synthetic_evaluator, tmp_path):
    checkpoint, _ = synthetic_evaluator
    result = run_script("evaluator.py", "test", "--checkpoint", checkpoint, "--data-dir", checkpoint.parent / "data",
                        "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    for name in ("clean", "blur sigma 1.2", "noise sigma 0.10"):
        assert re.search(rf"{name}: 0\.\d{{4}}", result.stdout)
    # the same held-out scenes as training reported (the split is stored in the checkpoint)
    trained = torch.load(checkpoint, weights_only=True)["held_out_accuracy"]
    assert json.loads((tmp_path / "r.json").read_text())["clean"] == pytest.approx(trained, abs=1e-6)
