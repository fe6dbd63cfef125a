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
from PIL import Image

import dataset
from cli import UserError, make_output_dir, read_json, replacing, run_cli
from evaluator import DEFAULT_CHECKPOINT, evaluation_model
from model import prepare_pipeline
from sampling import add_sampling_flags, compose_threshold, sampling_flags
from scoring import MISREADINGS, frechet_to_real, generate_sets, parse_condition_arg, pool_sets, score_sets


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


def print_pooled(pooled_by_evaluator):
    for path, pooled in pooled_by_evaluator.items():
        print(f"\nall {len(pooled['sets'])} sets pooled ({pooled['labels']} labels a seed, {Path(path).name}): "
              f"{pooled['mean']:.4f}±{pooled['std']:.4f} over {len(pooled['seeds'])} seeds (" +
              ", ".join(f"seed {seed}: {value:.4f}" for seed, value in pooled["seeds"].items()) + ")")


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
    add_sampling_flags(p, profiles=True)
    p.add_argument("--batch-size", type=int, default=64, help="images denoised at once")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--evaluator", action="append", metavar="CHECKPOINT",
                   help="evaluator checkpoint; given twice or more (--evaluator A --evaluator B), each scores the "
                        "same images and a table puts them side by side (default: ./checkpoint.pth or "
                        "$ICLEVR_EVALUATOR)")
    p.add_argument("--misread", type=int, default=5, metavar="N",
                   help="print the N requests of each set missed most, with what the evaluator read in their place "
                        "(all of them are in --json; 0: only the counts)")
    p.add_argument("--pool", action="store_true",
                   help="also score all the sets as one, per seed (each label of each set counted once; e.g. two "
                        "random: draws, or objects:4:32 and objects:4:32:1), with mean ± std over the seeds")
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
        whose = vocabulary.source
    else:
        pipe, sampling = prepare_pipeline(args.model, device=args.device, **sampling_flags(args))
        vocabulary, whose = pipe.unet.vocabulary, "the model"
    for evaluator in evaluators.values():  # before any image is read or drawn
        evaluator.check_label_order(vocabulary, whose)
    if args.samples:
        drawn, condition_sets, settings = {}, {}, {"samples": args.samples}
        for folder in args.samples:
            record, label_lists, batch = load_sample_folder(folder, vocabulary)
            name, seed = Path(folder).name, str(record.get("seed", 0))
            if name in drawn and (seed in drawn[name] or condition_sets[name] != label_lists):
                name = str(folder)  # not another seed of the same requests: scored on its own
            drawn.setdefault(name, {})[seed] = batch
            condition_sets[name] = label_lists
    else:
        sources = args.conditions or dataset.default_condition_files(args.data_dir)
        names, requests = zip(*(parse_condition_arg(text, vocabulary, data) for text in sources))
        condition_sets = dict(zip(dataset.unique_set_names(sources, list(names)), requests))
        drawn = generate_sets(pipe, condition_sets, sampling, range(args.seeds), args.batch_size,
                              compose_threshold(args))
        settings = {"model": args.model, **({"profile": args.profile} if args.profile else {}), **sampling.to_json(),
                    "seeds": args.seeds, "conditions": sources}
    by_evaluator = {path: score_sets(evaluator, drawn, condition_sets, vocabulary)
                    for path, evaluator in evaluators.items()}
    first, results = next(iter(evaluators.items())), next(iter(by_evaluator.values()))
    pooled = {path: pool_sets(scored) for path, scored in by_evaluator.items()} if args.pool else {}
    if None in pooled.values():
        raise UserError("--pool: the sets share no seed (each was drawn with other seeds): nothing to pool")
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
    print_pooled(pooled)
    for path, scored in by_evaluator.items():
        print_misreadings(scored, path, args.misread)
    others = {path: scored for path, scored in by_evaluator.items() if path != first[0]}
    with replacing(json_path) as temp:
        temp.write_text(json.dumps({"settings": settings, "evaluator": first[0], "results": results,
                                    **({"other_evaluators": others} if others else {}),
                                    **({"pooled": pooled} if pooled else {})}, indent=1))
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
