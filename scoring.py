"""The course's metric over generated images, and what evaluate.py and train.py's evaluation share: condition sets
(files, random:N, objects:K:N), scores per seed and object count, what each missed label was read as, and the
Fréchet distance to real images.
"""
from pathlib import Path

import numpy as np
import torch

import dataset
from cli import UserError
from evaluator import topk_choices
from model import generate

ICLEVR_MIX = {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}  # every i-CLEVR scene gives one image with 1, 2 and 3 objects


def score(evaluator, images_uint8, label_lists, vocabulary):
    """Pooled accuracy of one set of images, overall and by number of objects, and what the evaluator read
    instead of each label it missed ("misread": {image index: [[missed, read instead], ...]}). One top-k read per
    image (evaluator.topk_choices, as topk_hits counts it) serves all three."""
    onehot = vocabulary.encode_all(label_lists)
    scores = evaluator.predict(dataset.to_model_input(torch.from_numpy(np.ascontiguousarray(images_uint8))))
    hits, misread = [], {}
    for i, chosen in enumerate(topk_choices(scores, onehot)):
        read = [vocabulary.names[j] for j in chosen]
        missed = [name for name in label_lists[i] if name not in read]
        hits.append(len(label_lists[i]) - len(missed))
        pairs = pair_misreadings(missed, [name for name in read if name not in label_lists[i]])
        if pairs:
            misread[str(i)] = pairs
    counts = [len(labels) for labels in label_lists]
    by_objects = {str(k): sum(h for h, n in zip(hits, counts) if n == k) / (k * counts.count(k))
                  for k in sorted(set(counts))}
    return {"accuracy": sum(hits) / sum(counts), "hits": sum(hits), "labels": sum(counts), "by_objects": by_objects,
            "misread": misread}


def colour_and_shape(label):
    """'red cube' -> ('red', 'cube')."""
    colour, _, shape = label.partition(" ")
    return colour, shape


MISREADINGS = {"shape": "right colour, wrong shape", "colour": "right shape, wrong colour", "both": "both wrong"}


def pair_misreadings(missed, read_instead):
    """Pairs each missed label with a label read in its place (top-k reads as many wrong labels as it misses):
    one of the same colour first (the shape was misread), then one of the same shape (the colour was), then
    any."""
    left, pairs = list(read_instead), []
    for same in (lambda a, b: a[0] == b[0], lambda a, b: a[1] == b[1], lambda a, b: True):
        for label in [m for m in missed if m not in {pair[0] for pair in pairs}]:
            match = next((r for r in left if same(colour_and_shape(label), colour_and_shape(r))), None)
            if match is not None:
                pairs.append([label, match])
                left.remove(match)
    return pairs


def misreading_kind(missed, read):
    (colour, shape), (read_colour, read_shape) = colour_and_shape(missed), colour_and_shape(read)
    return "shape" if colour == read_colour else "colour" if shape == read_shape else "both"


def repeats_a_colour(labels):
    colours = [colour_and_shape(label)[0] for label in labels]
    return len(set(colours)) < len(colours)


def misreadings(per_seed, label_lists):
    """Over all seeds: the misses by kind, the accuracy of requests that repeat a colour (where two objects of one
    colour may merge into one blob), and each request that was missed, with what was read in its place."""
    kinds = dict.fromkeys(MISREADINGS, 0)
    requests = {}
    for seed, result in per_seed.items():
        for i, pairs in result["misread"].items():
            request = requests.setdefault(i, {"labels": label_lists[int(i)], "misread": []})
            for missed, read in pairs:
                kinds[misreading_kind(missed, read)] += 1
                request["misread"].append([missed, read, seed])
    repeated = [i for i, labels in enumerate(label_lists) if repeats_a_colour(labels)]
    repeated_labels = sum(len(label_lists[i]) for i in repeated) * len(per_seed)
    repeated_misses = sum(len(result["misread"].get(str(i), [])) for result in per_seed.values() for i in repeated)
    worst = sorted(requests.items(), key=lambda item: (-len(item[1]["misread"]), int(item[0])))
    return {"kinds": kinds,
            "repeated_colour": {"requests": len(repeated), "accuracy": (1 - repeated_misses / repeated_labels)
                                if repeated else None},
            "requests": {i: request for i, request in worst}}


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def reference_indices(data, mix, count, seed=0, exclude=()):
    """`count` real training images drawn with the object-count mix `mix`, none of them in `exclude`."""
    rng = np.random.default_rng(seed)
    objects = data.labels.sum(1).astype(int)
    sizes = np.diff(np.round(np.cumsum([0, *mix.values()]) / sum(mix.values()) * count)).astype(int)
    chosen = []
    for k, size in zip(mix, sizes):
        pool = np.setdiff1d(np.flatnonzero(objects == int(k)), exclude)
        chosen.extend(rng.choice(pool, size=min(len(pool), size), replace=False))
    return np.sort(np.array(chosen, dtype=int))


def features_of(evaluator, images_uint8, batch_size=256):
    return torch.cat([evaluator.features(dataset.to_model_input(torch.from_numpy(images_uint8[i:i + batch_size])))
                      for i in range(0, len(images_uint8), batch_size)]).numpy()


def frechet_to_real(evaluator, generated, data, mix, count):
    """The Fréchet distance of generated images to `count` real ones of the same object-count mix, and its floor:
    the distance of those real images to as many other real ones (what a perfect generator would score)."""
    reference = reference_indices(data, mix, count)
    if len(reference) < 2:  # e.g. 4-object requests: no real scene holds that many
        return {}
    others = reference_indices(data, mix, count, seed=1, exclude=reference)
    real = features_of(evaluator, data.images[reference])
    found = {"frechet": frechet_distance(features_of(evaluator, generated), real), "frechet_images": len(generated),
             "frechet_reference": len(reference)}
    if len(others) == len(reference):
        found["frechet_floor"] = frechet_distance(features_of(evaluator, data.images[others]), real)
    return found


def summarise(per_seed, label_lists):
    accuracies = [r["accuracy"] for r in per_seed.values()]
    keys = sorted({k for r in per_seed.values() for k in r["by_objects"]})
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "by_objects": {k: float(np.mean([r["by_objects"][k] for r in per_seed.values() if k in r["by_objects"]]))
                           for k in keys},
            "misreadings": misreadings(per_seed, label_lists)}


def pool_sets(results):
    """Every set of `results` (score_sets' output) scored as one, per seed: the labels hit over the labels asked,
    each label of each set counted once, so that a large set weighs more than a small one. Only the seeds that
    every set was drawn with count; None when there is no such seed."""
    seeds = sorted(set.intersection(*(set(result["seeds"]) for result in results.values())), key=int)
    if not seeds:
        return None
    per_seed = {seed: sum(result["seeds"][seed]["hits"] for result in results.values()) /
                sum(result["seeds"][seed]["labels"] for result in results.values()) for seed in seeds}
    return {"sets": list(results), "labels": sum(result["seeds"][seeds[0]]["labels"] for result in results.values()),
            "seeds": per_seed, "mean": float(np.mean(list(per_seed.values()))),
            "std": float(np.std(list(per_seed.values())))}


def generate_sets(pipe, condition_sets, settings, seeds, batch_size=64, compose_above="auto"):
    """{name: {seed: images}}: every condition set drawn with every seed, with `settings` (a SamplingSettings)."""
    return {name: {str(seed): generate(pipe, label_lists, settings, seed, batch_size, compose_above=compose_above)
                   for seed in seeds}
            for name, label_lists in condition_sets.items()}


def score_sets(evaluator, drawn, condition_sets, vocabulary):
    """{name: {"seeds": {seed: score}, "mean": ..., "std": ..., "by_objects": ..., "misreadings": ...}}."""
    results = {}
    for name, by_seed in drawn.items():
        per_seed = {seed: score(evaluator, images, condition_sets[name], vocabulary)
                    for seed, images in by_seed.items()}
        results[name] = {"seeds": per_seed, **summarise(per_seed, condition_sets[name])}
    return results


def evaluate_model(pipe, evaluator, condition_sets, settings, seeds=(0,), batch_size=64):
    """Generate every condition set with every seed and score it: {name: {"seeds": ..., "mean": ...}},
    plus the generated images per name, all seeds together (for the Fréchet distance)."""
    evaluator.check_label_order(pipe.unet.vocabulary, "the model")
    drawn = generate_sets(pipe, condition_sets, settings, seeds, batch_size)
    images = {name: np.concatenate(list(by_seed.values())) for name, by_seed in drawn.items()}
    return score_sets(evaluator, drawn, condition_sets, pipe.unet.vocabulary), images


def parse_condition_arg(text, vocabulary, data):
    """A condition file; random:N[:SEED], N label sets with the training set's object-count mix; or
    objects:K:N[:SEED], N sets of K labels, each an object of a different training scene (K may exceed the
    largest training scene)."""
    kind = text.split(":")[0]
    if kind in ("random", "objects"):
        parts = text.split(":")
        usage = "random:N or random:N:SEED" if kind == "random" else "objects:K:N or objects:K:N:SEED"
        numbers = 2 if kind == "random" else 3  # the kind and its counts, before the optional seed
        try:
            counts = [int(part) for part in parts[1:numbers]]
            seed = int(parts[numbers]) if len(parts) > numbers else 0
        except (ValueError, IndexError):
            raise UserError(f"--conditions {text}: expected {usage}")
        if len(counts) < numbers - 1 or min(counts) < 1 or len(parts) > numbers + 1:
            raise UserError(f"--conditions {text}: expected {usage}, with positive numbers")
        name = text.replace(":", "-")
        if kind == "random":
            mix = dataset.object_count_mix(data.label_lists) if data is not None else ICLEVR_MIX
            return name, dataset.random_conditions(counts[0], vocabulary, mix, seed)
        if data is None:
            raise UserError(f"--conditions {text}: needs the training scenes (--data-dir with train.json)")
        objects, count = counts
        return name, dataset.scene_object_conditions(data.filenames, data.label_lists, count, objects, seed)
    return Path(text).stem, dataset.load_conditions(text, vocabulary)
