"""Score generated images with the evaluator: pooled top-k accuracy (the course's metric), by object count,
and a Fréchet distance to real training images in the evaluator's 512-d features.

    python evaluate.py --samples samples/test samples/new_test           # folders written by sample.py
    python evaluate.py --model runs/small/model --conditions data/test.json data/new_test.json \\
        --seeds 5 --sampler ddim --steps 20 --guidance-scale 3           # generate and score in one go
    python evaluate.py --model runs/small/model --conditions random:500   # select models without test files

`random:N` (or `random:N:SEED`) draws N label sets with the training set's mix of object counts, so model,
checkpoint and guidance-scale choices never have to look at test.json / new_test.json. `objects:K:N[:SEED]`
draws N sets of K labels, each an object of a different training scene: with K = 4 to 6, scenes larger than
any the data holds (drawn by composition, see sample.py --compose-above).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataset
from cli import UserError, make_output_dir, read_json, replacing, run_cli
from evaluator import DEFAULT_CHECKPOINT, evaluation_model, topk_choices, topk_hits
from model import DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS, SAMPLERS
from sample import generate, generation_options, parse_guidance_by_objects, prepare_pipeline

ICLEVR_MIX = {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}  # every i-CLEVR scene gives one image with 1, 2 and 3 objects


# ---------------------------------------------------------------------------------------------------------
# Scores


def score(evaluator, images_uint8, label_lists, vocabulary):
    """Pooled accuracy of one set of images, overall and by number of objects, and what the evaluator read
    instead of each label it missed ("misread": {image index: [[missed, read instead], ...]})."""
    onehot = vocabulary.encode_all(label_lists)
    scores = evaluator.predict(dataset.to_model_input(torch.from_numpy(np.ascontiguousarray(images_uint8))))
    counts = onehot.sum(1).long()
    by_objects = {}
    for k in sorted(set(counts.tolist())):
        hits, total = topk_hits(scores[counts == k], onehot[counts == k])
        by_objects[str(k)] = hits / total
    hits, total = topk_hits(scores, onehot)
    misread = {}
    for i, chosen in enumerate(topk_choices(scores, onehot)):
        read = [vocabulary.names[j] for j in chosen]
        pairs = pair_misreadings([name for name in label_lists[i] if name not in read],
                                 [name for name in read if name not in label_lists[i]])
        if pairs:
            misread[str(i)] = pairs
    return {"accuracy": hits / total, "by_objects": by_objects, "misread": misread}


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


def generate_sets(pipe, condition_sets, seeds, batch_size=64, **options):
    """{name: {seed: images}}: every condition set drawn with every seed. `options`: generate's steps,
    guidance_scale, guidance_max_t, precision, compose_above, guidance_by_objects, joint_weight."""
    return {name: {str(seed): generate(pipe, label_lists, seed, batch_size=batch_size, **options) for seed in seeds}
            for name, label_lists in condition_sets.items()}


def score_sets(evaluator, drawn, condition_sets, vocabulary):
    """{name: {"seeds": {seed: score}, "mean": ..., "std": ..., "by_objects": ..., "misreadings": ...}}."""
    results = {}
    for name, by_seed in drawn.items():
        per_seed = {seed: score(evaluator, images, condition_sets[name], vocabulary)
                    for seed, images in by_seed.items()}
        results[name] = {"seeds": per_seed, **summarise(per_seed, condition_sets[name])}
    return results


def evaluate_model(pipe, evaluator, condition_sets, seeds=(0,), batch_size=64, **options):
    """Generate every condition set with every seed and score it: {name: {"seeds": ..., "mean": ...}},
    plus the generated images per name, all seeds together (for the Fréchet distance)."""
    evaluator.check_label_order(pipe.unet.vocabulary, "the model")
    drawn = generate_sets(pipe, condition_sets, seeds, batch_size, **options)
    images = {name: np.concatenate(list(by_seed.values())) for name, by_seed in drawn.items()}
    return score_sets(evaluator, drawn, condition_sets, pipe.unet.vocabulary), images


# ---------------------------------------------------------------------------------------------------------
# Command line


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


def load_sample_folder(folder, vocabulary):
    folder = Path(folder)
    record = read_json(folder / "conditions.json", "conditions.json (is this a sample.py folder?)")
    try:
        label_lists = dataset.parse_conditions(record["labels"], vocabulary, folder / "conditions.json")
        images = np.stack([np.asarray(Image.open(folder / name).convert("RGB")) for name in record["images"]])
    except (KeyError, TypeError):
        raise UserError(f"{folder / 'conditions.json'}: missing 'labels' or 'images'")
    except OSError as error:
        raise UserError(f"{folder}: cannot read an image ({error})")
    if len(images) != len(label_lists) or images.shape[1:] != (64, 64, 3):
        raise UserError(f"{folder}: expected {len(label_lists)} images of 64x64, found {images.shape}")
    return record, label_lists, images


def format_cell(value):
    return f" {'-':>7s}" if value is None else f" {value:>7.4f}"


def print_table(results):
    counts = sorted({k for r in results.values() for k in r["by_objects"]})
    header = f"{'conditions':<16s} {'seed':>9s} {'accuracy':>15s}" + "".join(f" {k + ' obj':>7s}" for k in counts)
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        for seed, r in result["seeds"].items():
            print(f"{name:<16s} {seed:>9s} {r['accuracy']:>15.4f}" +
                  "".join(format_cell(r["by_objects"].get(k)) for k in counts))
        if len(result["seeds"]) > 1:
            print(f"{name:<16s} {'mean±std':>9s} {result['mean']:>8.4f}±{result['std']:.4f}" +
                  "".join(format_cell(result["by_objects"].get(k)) for k in counts))
        if "frechet" in result:
            floor = (f"; real vs as many other real: {result['frechet_floor']:.2f}" if "frechet_floor" in result
                     else "")
            print(f"{name:<16s} {'Fréchet distance to real images':>34s}: {result['frechet']:.2f} "
                  f"({result['frechet_images']} generated vs {result['frechet_reference']} real{floor}; biased "
                  f"upwards with few images in 512 dimensions: compare only at equal numbers)")


def print_agreement(by_evaluator):
    """Each evaluator's mean per set, side by side, and how far the last is from the first, per object count:
    where two readers of one image disagree, its objects are ambiguous."""
    names = list(by_evaluator)
    first, last = by_evaluator[names[0]], by_evaluator[names[-1]]
    counts = sorted({k for results in by_evaluator.values() for r in results.values() for k in r["by_objects"]})
    header = (f"{'conditions':<16s}" + "".join(f" {Path(n).name[:15]:>15s}" for n in names) + f" {'gap':>7s}" +
              "".join(f" {'gap ' + k:>7s}" for k in counts))
    print(f"\nthe same images, {len(names)} evaluators (gap: the last minus the first)")
    print(header)
    print("-" * len(header))
    for name in first:
        gaps = [last[name]["by_objects"][k] - first[name]["by_objects"][k] if k in first[name]["by_objects"] else None
                for k in counts]
        print(f"{name:<16s}" + "".join(f" {results[name]['mean']:>15.4f}" for results in by_evaluator.values()) +
              f" {last[name]['mean'] - first[name]['mean']:>+7.4f}" +
              "".join(f" {'-':>7s}" if gap is None else f" {gap:>+7.4f}" for gap in gaps))


def print_misreadings(results, evaluator, most):
    """Per set: the labels missed, by kind; the requests that repeat a colour; the `most` requests missed most."""
    print(f"\nmissed labels ({Path(evaluator).name}): what was read in their place")
    for name, result in results.items():
        found = result["misreadings"]
        missed = sum(found["kinds"].values())
        kinds = "; ".join(f"{MISREADINGS[kind]}: {n}" for kind, n in found["kinds"].items())
        repeated = found["repeated_colour"]
        line = f"{name}: {missed} missed ({kinds})"
        if repeated["accuracy"] is not None:
            line += f"; the {repeated['requests']} requests repeating a colour: {repeated['accuracy']:.4f}"
        print(line)
        for request in list(found["requests"].values())[:most]:
            seen = {}
            for missed_label, read, seed in request["misread"]:
                seen.setdefault(f"{missed_label} read as {read}", []).append(seed)
            print(f"  {', '.join(request['labels'])}: " +
                  "; ".join(f"{what} (seed {', '.join(seeds)})" for what, seeds in seen.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", metavar="DIR",
                   help="sample.py output folders to score; folders of one name and the same requests drawn with "
                        "other seeds (s0/test s1/test ...) are scored as one set: each seed, then mean ± std")
    p.add_argument("--model", help="model folder to generate from (with --conditions)")
    p.add_argument("--conditions", nargs="+", metavar="FILE",
                   help="condition files, random:N[:SEED] (N label sets with the training mix of object counts) or "
                        "objects:K:N[:SEED] (N sets of K objects from different training scenes) (default: "
                        "DATA_DIR/test.json DATA_DIR/new_test.json)")
    p.add_argument("--seeds", type=int, default=1, help="score with seeds 0..N-1 and report mean ± std")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help=f"sampler for --model (default: the model folder's sampling.json, else {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model folder's, else " +
                   ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance, 1 = none (default: the model folder's, else 1)")
    p.add_argument("--guidance-max-t", type=int,
                   help="guide only the steps at timesteps below this; 1000 = every step (default: the model "
                        "folder's, else every step)")
    p.add_argument("--guidance-by-objects", nargs="+", metavar="K:SCALE[:MAX_T]",
                   help="a guidance of its own for requests of K labels, e.g. 4:2 (scale 2 on every step); others "
                        "keep --guidance-scale and --guidance-max-t (default: the model folder's, else none)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the UNet's arithmetic while sampling: fp32, or bf16 where the hardware has it (default: "
                        "the model folder's, else fp32); the evaluator always scores in fp32")
    p.add_argument("--compose-above", type=int, metavar="N",
                   help="draw requests of more than N labels by composing their N-label sub-requests (default: the "
                        "largest scene the model was trained on; 0: never)")
    p.add_argument("--joint-weight", type=float, metavar="W",
                   help="for a composed request, the share of its conditional output that reads the request whole "
                        "(default: the model folder's, else 0: composition alone)")
    p.add_argument("--batch-size", type=int, default=64, help="images denoised at once")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--evaluator", action="append", metavar="CHECKPOINT",
                   help="evaluator checkpoint; given twice or more (--evaluator A --evaluator B), each scores the "
                        "same images and a table puts them side by side (default: ./checkpoint.pth or "
                        "$ICLEVR_EVALUATOR)")
    p.add_argument("--misread", type=int, default=5, metavar="N",
                   help="print the N requests of each set missed most, with what the evaluator read in their place "
                        "(all of them are in --json; 0: only the counts)")
    p.add_argument("--data-dir", default=dataset.DEFAULT_DATA_DIR,
                   help="course data: default condition files, the object-count mix of random:N, and the real "
                        "images of the Fréchet distance")
    p.add_argument("--reference-images", type=int, default=2000,
                   help="real images for the Fréchet distance (0 = skip it)")
    p.add_argument("--json", default="evaluation.json", help="where to write the results")
    args = p.parse_args(argv)
    if bool(args.samples) == bool(args.model):
        p.error("give either --samples DIR... or --model MODEL")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.misread < 0:
        p.error("--misread must be 0 or more")
    args.evaluator = args.evaluator or [DEFAULT_CHECKPOINT]
    return args


def main(argv=None):
    args = parse_args(argv)
    json_path = Path(args.json)
    make_output_dir(json_path.parent)
    device = None if args.device == "auto" else args.device
    evaluators = {str(path): evaluation_model(path, device=device) for path in args.evaluator}
    have_data = (Path(args.data_dir) / "train.json").is_file()
    data = dataset.load_training_set(args.data_dir) if have_data and (args.model or args.reference_images) else None
    if args.samples:
        vocabulary = dataset.find_vocabulary(args.data_dir)
        drawn, condition_sets, settings = {}, {}, {"samples": args.samples}
        for folder in args.samples:
            record, label_lists, batch = load_sample_folder(folder, vocabulary)
            name, seed = Path(folder).name, str(record.get("seed", 0))
            if name in drawn and (seed in drawn[name] or condition_sets[name] != label_lists):
                name = str(folder)  # not another seed of the same requests: scored on its own
            drawn.setdefault(name, {})[seed] = batch
            condition_sets[name] = label_lists
        whose = vocabulary.source
    else:
        pipe, sampling = prepare_pipeline(args.model, args.sampler, args.steps, args.guidance_scale, args.device,
                                          args.guidance_max_t, args.precision,
                                          parse_guidance_by_objects(args.guidance_by_objects), args.joint_weight)
        vocabulary, whose = pipe.unet.vocabulary, "the model"
        sources = args.conditions or dataset.default_condition_files(args.data_dir)
        names, requests = zip(*(parse_condition_arg(text, vocabulary, data) for text in sources))
        condition_sets = dict(zip(dataset.unique_set_names(sources, list(names)), requests))
        for evaluator in evaluators.values():  # before minutes of sampling
            evaluator.check_label_order(vocabulary, whose)
        drawn = generate_sets(pipe, condition_sets, range(args.seeds), args.batch_size,
                              **generation_options(sampling, args.compose_above))
        settings = {"model": args.model, **sampling, "seeds": args.seeds, "conditions": sources}
    by_evaluator = {}
    for path, evaluator in evaluators.items():
        evaluator.check_label_order(vocabulary, whose)
        by_evaluator[path] = score_sets(evaluator, drawn, condition_sets, vocabulary)
    first, results = next(iter(evaluators.items())), next(iter(by_evaluator.values()))
    if data is not None and args.reference_images:
        for name, by_seed in drawn.items():
            mix = dataset.object_count_mix(condition_sets[name])  # real images with the same object counts
            results[name].update(frechet_to_real(first[1], np.concatenate(list(by_seed.values())), data, mix,
                                                 args.reference_images))
    for path, scored in by_evaluator.items():
        if len(by_evaluator) > 1:
            print(f"\nevaluator {path}")
        print_table(scored)
    if len(by_evaluator) > 1:
        print_agreement(by_evaluator)
    for path, scored in by_evaluator.items():
        print_misreadings(scored, path, args.misread)
    others = {path: scored for path, scored in by_evaluator.items() if path != first[0]}
    with replacing(json_path) as temp:
        temp.write_text(json.dumps({"settings": settings, "evaluator": first[0], "results": results,
                                    **({"other_evaluators": others} if others else {})}, indent=1))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
