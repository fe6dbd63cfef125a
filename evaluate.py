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
from evaluator import DEFAULT_CHECKPOINT, evaluation_model, topk_hits
from model import DEFAULT_SAMPLER, DEFAULT_STEPS, PRECISIONS, SAMPLERS
from sample import generate, generation_options, parse_guidance_by_objects, prepare_pipeline

ICLEVR_MIX = {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}  # every i-CLEVR scene gives one image with 1, 2 and 3 objects


# ---------------------------------------------------------------------------------------------------------
# Scores


def score(evaluator, images_uint8, label_lists, vocabulary):
    """Pooled accuracy of one set of images, overall and by number of objects."""
    onehot = vocabulary.encode_all(label_lists)
    scores = evaluator.predict(dataset.to_model_input(torch.from_numpy(np.ascontiguousarray(images_uint8))))
    counts = onehot.sum(1).long()
    by_objects = {}
    for k in sorted(set(counts.tolist())):
        hits, total = topk_hits(scores[counts == k], onehot[counts == k])
        by_objects[str(k)] = hits / total
    hits, total = topk_hits(scores, onehot)
    return {"accuracy": hits / total, "by_objects": by_objects}


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def reference_features(evaluator, data, mix, count, seed=0):
    """Evaluator features of `count` real training images drawn with the object-count mix `mix`."""
    rng = np.random.default_rng(seed)
    objects = data.labels.sum(1).astype(int)
    sizes = np.diff(np.round(np.cumsum([0, *mix.values()]) / sum(mix.values()) * count)).astype(int)
    chosen = []
    for k, size in zip(mix, sizes):
        pool = np.flatnonzero(objects == int(k))
        chosen.extend(rng.choice(pool, size=min(len(pool), size), replace=False))
    return features_of(evaluator, data.images[np.sort(chosen)])


def features_of(evaluator, images_uint8, batch_size=256):
    return torch.cat([evaluator.features(dataset.to_model_input(torch.from_numpy(images_uint8[i:i + batch_size])))
                      for i in range(0, len(images_uint8), batch_size)]).numpy()


def summarise(per_seed):
    accuracies = [r["accuracy"] for r in per_seed.values()]
    keys = sorted({k for r in per_seed.values() for k in r["by_objects"]})
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
            "by_objects": {k: float(np.mean([r["by_objects"][k] for r in per_seed.values() if k in r["by_objects"]]))
                           for k in keys}}


def evaluate_model(pipe, evaluator, condition_sets, seeds=(0,), batch_size=64, **options):
    """Generate every condition set with every seed and score it: {name: {"seeds": ..., "mean": ...}},
    plus the generated images per name (for the Fréchet distance). `options`: generate's steps, guidance_scale,
    guidance_max_t, precision, compose_above, guidance_by_objects, joint_weight."""
    vocabulary = pipe.unet.vocabulary
    evaluator.check_label_order(vocabulary, "the model")
    results, images = {}, {}
    for name, label_lists in condition_sets.items():
        per_seed, generated = {}, []
        for seed in seeds:
            batch = generate(pipe, label_lists, seed, batch_size=batch_size, **options)
            per_seed[str(seed)] = score(evaluator, batch, label_lists, vocabulary)
            generated.append(batch)
        results[name] = {"seeds": per_seed, **summarise(per_seed)}
        images[name] = np.concatenate(generated)
    return results, images


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
            print(f"{name:<16s} {'Fréchet distance to real images':>34s}: {result['frechet']:.2f} "
                  f"({result['frechet_images']} generated vs {result['frechet_reference']} real; biased upwards "
                  f"with so few images in 512 dimensions: compare only at equal numbers)")


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
    p.add_argument("--evaluator", default=DEFAULT_CHECKPOINT,
                   help="evaluator checkpoint (default: ./checkpoint.pth or $ICLEVR_EVALUATOR)")
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
    return args


def main(argv=None):
    args = parse_args(argv)
    json_path = Path(args.json)
    make_output_dir(json_path.parent)
    evaluator = evaluation_model(args.evaluator, device=None if args.device == "auto" else args.device)
    have_data = (Path(args.data_dir) / "train.json").is_file()
    data = dataset.load_training_set(args.data_dir) if have_data and (args.model or args.reference_images) else None
    if args.samples:
        vocabulary = dataset.find_vocabulary(args.data_dir)
        evaluator.check_label_order(vocabulary, vocabulary.source)
        per_name, images, condition_sets, settings = {}, {}, {}, {"samples": args.samples}
        for folder in args.samples:
            record, label_lists, batch = load_sample_folder(folder, vocabulary)
            name, seed = Path(folder).name, str(record.get("seed", 0))
            if name in per_name and (seed in per_name[name] or condition_sets[name] != label_lists):
                name = str(folder)  # not another seed of the same requests: scored on its own
            per_name.setdefault(name, {})[seed] = score(evaluator, batch, label_lists, vocabulary)
            images[name] = np.concatenate([images[name], batch]) if name in images else batch
            condition_sets[name] = label_lists
        results = {name: {"seeds": per_seed, **summarise(per_seed)} for name, per_seed in per_name.items()}
    else:
        pipe, sampling = prepare_pipeline(args.model, args.sampler, args.steps, args.guidance_scale, args.device,
                                          args.guidance_max_t, args.precision,
                                          parse_guidance_by_objects(args.guidance_by_objects), args.joint_weight)
        sources = args.conditions or dataset.default_condition_files(args.data_dir)
        condition_sets = dict(parse_condition_arg(text, pipe.unet.vocabulary, data) for text in sources)
        results, images = evaluate_model(pipe, evaluator, condition_sets, range(args.seeds), args.batch_size,
                                         **generation_options(sampling, args.compose_above))
        settings = {"model": args.model, **sampling, "seeds": args.seeds, "conditions": sources}
    if data is not None and args.reference_images:
        for name, batch in images.items():
            mix = dataset.object_count_mix(condition_sets[name])  # real images with the same object counts
            reference = reference_features(evaluator, data, mix, args.reference_images)
            results[name].update(frechet=frechet_distance(features_of(evaluator, batch), reference),
                                 frechet_images=len(batch), frechet_reference=len(reference))
    print_table(results)
    with replacing(json_path) as temp:
        temp.write_text(json.dumps({"settings": settings, "evaluator": str(args.evaluator), "results": results},
                                   indent=1))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
