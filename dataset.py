"""i-CLEVR data: the label vocabulary, condition files, and the training images held in memory.

The course layout is a folder with `iclevr/` (64x64 PNGs), `train.json` (filename -> labels) and
`objects.json` (label -> index). Every problem with the user's input is raised as `cli.UserError`, which the
command-line scripts print as one line.
"""
import difflib
import hashlib
import io
import json
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

# In a model folder that diffusers loads with trust_remote_code, the project's files lie beside this one as a
# package; in the project they are top-level modules. Each fallback stays on its except line, where
# diffusers' import check does not read it as a package to pip install.
try:
    from .cli import UserError, read_json, replacing, warn
except ImportError: from cli import UserError, read_json, replacing, warn  # noqa: E701

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_VOCABULARY = PROJECT_DIR / "object.json"
DEFAULT_CACHE_DIR = Path(os.environ.get("ICLEVR_CACHE_DIR", Path.home() / ".cache" / "iclevr-ddpm"))
DEFAULT_DATA_DIR = os.environ.get("ICLEVR_DATA_DIR", "data")
SYNTHETIC = "synthetic"  # --data-dir value that asks for generated scenes instead of the course files
IMAGE_SIZE = 64
PACK = "iclevr.npz"  # a data folder may hold its images packed in one file instead of iclevr/ (bench/gpu_bundle.py)
JPEG_MAX_WIDTH = 65_500  # pixels: a JPEG image is at most 65,535 wide


# ---------------------------------------------------------------------------------------------------------
# Labels


class Vocabulary:
    """The label names and their indices in the multi-hot vector (24 for i-CLEVR)."""

    def __init__(self, index_of, source="vocabulary"):
        if not isinstance(index_of, dict) or not index_of:
            raise UserError(f"{source}: expected a JSON object mapping label names to indices")
        indices = sorted(index_of.values()) if all(isinstance(i, int) for i in index_of.values()) else None
        if indices != list(range(len(index_of))):
            raise UserError(f"{source}: label indices must be the integers 0..{len(index_of) - 1}, each once")
        self.index_of = dict(index_of)
        self.names = sorted(index_of, key=index_of.get)
        self.source = str(source)

    @classmethod
    def load(cls, path):
        return cls(read_json(path, "label vocabulary"), source=path)

    def __len__(self):
        return len(self.names)

    def encode(self, labels):
        vector = np.zeros(len(self.names), dtype=np.float32)
        vector[[self.index_of[label] for label in labels]] = 1.0
        return vector

    def encode_all(self, label_lists):
        return torch.from_numpy(np.stack([self.encode(labels) for labels in label_lists]))

    def decode(self, vector):
        """Multi-hot (or probability) vector -> label names above 0.5, in vocabulary order."""
        return [self.names[i] for i, value in enumerate(np.asarray(vector).tolist()) if value > 0.5]

    def check(self, labels, where):
        """Validate one label list; `where` names it in the error (file and entry index)."""
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UserError(f"{where}: expected a list of label names, got {json.dumps(labels)[:80]}")
        if not labels:
            raise UserError(f"{where}: empty label list")
        seen = set()
        for label in labels:
            if label not in self.index_of:
                close = difflib.get_close_matches(label, self.names, n=3, cutoff=0.4)
                hint = f" (closest: {', '.join(repr(c) for c in close)})" if close else ""
                raise UserError(f"{where}: unknown label {label!r}{hint}")
            if label in seen:
                raise UserError(f"{where}: label {label!r} appears twice")
            seen.add(label)
        return labels


def find_vocabulary(data_dir=None, path=None):
    """An explicit path, else the data dir's objects.json / object.json, else the project's object.json."""
    if path is not None:
        return Vocabulary.load(path)
    for name in ("objects.json", "object.json"):
        if data_dir is not None and (Path(data_dir) / name).is_file():
            return Vocabulary.load(Path(data_dir) / name)
    return Vocabulary.load(DEFAULT_VOCABULARY)


def parse_conditions(entries, vocabulary, source):
    """A list of label lists (the test.json format), validated entry by entry."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: expected a non-empty JSON list of label lists")
    return [vocabulary.check(labels, f"{source}: entry {i}") for i, labels in enumerate(entries)]


def load_conditions(path, vocabulary):
    return parse_conditions(read_json(path, "condition file"), vocabulary, path)


def default_condition_files(data_dir):
    return [str(Path(data_dir) / "test.json"), str(Path(data_dir) / "new_test.json")]


def unique_set_names(sources, names):
    """`names`, one per condition source (a file's stem, a draw's own name), made unique for the folders and
    results they key: where two share one, each becomes PARENT-NAME (a/test.json, b/test.json -> a-test, b-test),
    so that neither overwrites the other."""
    repeated = {name for name in names if names.count(name) > 1}
    unique = [f"{Path(source).parent.name}-{name}" if name in repeated else name
              for source, name in zip(sources, names)]
    clash = next((name for name in unique if unique.count(name) > 1), None)
    if clash is not None:
        raise UserError(f"two condition sets would both be named {clash!r} (one file given twice, or files of one "
                        f"name in folders of one name): give each once, or rename one")
    return unique


def parse_label_string(text, vocabulary):
    """--labels "red sphere,cyan cube" -> ["red sphere", "cyan cube"]."""
    labels = [label.strip() for label in text.split(",") if label.strip()]
    return vocabulary.check(labels, "--labels")


def object_count_mix(label_lists):
    """Fraction of label sets with 1, 2, ... objects."""
    counts = np.bincount([len(labels) for labels in label_lists])
    return {k: counts[k] / counts.sum() for k in range(1, len(counts)) if counts[k]}


def random_conditions(count, vocabulary, mix, seed):
    """`count` label sets of distinct labels, with the object-count mix `mix` ({k: fraction})."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice(list(mix), size=count, p=np.array(list(mix.values())) / sum(mix.values()))
    return [[vocabulary.names[i] for i in rng.choice(len(vocabulary), size=k, replace=False)] for k in sizes]


def scene_object_conditions(filenames, label_lists, count, objects, seed):
    """`count` label sets of `objects` distinct labels, each label an object of a different training scene: larger
    scenes than the data holds (i-CLEVR has at most 3 objects), built from objects it does show, no scene copied."""
    scene_objects = {}
    for name, labels in zip(filenames, label_lists):
        scene_objects.setdefault(scene_of(name), set()).update(labels)
    scenes = [sorted(scene_objects[scene]) for scene in sorted(scene_objects)]
    if len(scenes) < objects:
        raise UserError(f"{objects} objects from different scenes, but the data has only {len(scenes)} scenes")
    rng = np.random.default_rng(seed)
    sets = []
    while len(sets) < count:
        picked = [scenes[i][rng.integers(len(scenes[i]))] for i in rng.choice(len(scenes), objects, replace=False)]
        if len(set(picked)) == objects:  # a label twice: draw this set again
            sets.append(picked)
    return sets


# ---------------------------------------------------------------------------------------------------------
# Scenes and the held-out split

SCENE_PATTERN = re.compile(r"^(.*_\d+)_(\d+)\.png$")  # (scene, step): one object added each step


def scene_of(filename):
    """CLEVR_train_000123_2.png -> CLEVR_train_000123: the three images of one scene share it."""
    match = SCENE_PATTERN.match(filename)
    return match.group(1) if match else filename


def scene_position(scene, seed=0):
    """A stable pseudo-random number in [0, 1) per scene: the same on every machine."""
    digest = hashlib.sha256(f"{seed}:{scene}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(scene, fraction, seed=0):
    """Stable pseudo-random scene-level split: the same scene is on the same side on every machine."""
    return scene_position(scene, seed) < fraction


def split_by_scene(filenames, fraction, seed=0):
    held = np.array([is_held_out(scene_of(name), fraction, seed) for name in filenames], dtype=bool)
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_off_scenes(filenames, count, seed=0):
    """(kept, held) indices, holding out whole scenes, those first in scene_position order, until at least
    `count` images are held. They are the scenes any split_by_scene(fraction, seed) holds out first, so with the
    same seed they stay inside the evaluator's held-out scenes."""
    positions = np.array([scene_position(scene_of(name), seed) for name in filenames])
    order = np.argsort(positions, kind="stable")
    if count <= 0:
        return np.arange(len(filenames)), np.array([], dtype=int)
    threshold = positions[order[min(count, len(order)) - 1]]
    held = positions <= threshold  # whole scenes: every image of the last scene shares its position
    return np.flatnonzero(~held), np.flatnonzero(held)


# ---------------------------------------------------------------------------------------------------------
# Images


@dataclass
class TrainingSet:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: np.ndarray  # (N, num_labels) float32 multi-hot
    filenames: list
    label_lists: list
    vocabulary: Vocabulary
    data_dir: Path = None

    def __len__(self):
        return len(self.filenames)

    def subset(self, indices):
        return TrainingSet(self.images[indices], self.labels[indices], [self.filenames[i] for i in indices],
                           [self.label_lists[i] for i in indices], self.vocabulary, self.data_dir)

    def joined(self, other):
        return TrainingSet(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]),
                           self.filenames + other.filenames, self.label_lists + other.label_lists, self.vocabulary,
                           self.data_dir)


def read_image(path, size=IMAGE_SIZE):
    """-> (uint8 HxWx3 array, original size or None when it already had the right size)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        original = image.size
        if original != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8), (original if original != (size, size) else None)


def decode_images(image_dir, filenames, size=IMAGE_SIZE):
    """Decode every image once; name what is missing or unreadable, warn about what was resized."""
    def load(name):
        try:
            return read_image(image_dir / name, size) + (None,)
        except FileNotFoundError:
            return None, None, "missing"
        except UnidentifiedImageError:
            return None, None, "not a readable image"
        except Exception as error:  # a truncated file raises OSError, SyntaxError, ... depending on where it breaks
            return None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"

    images = np.zeros((len(filenames), size, size, 3), dtype=np.uint8)
    failed, resized = [], []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(pool.map(load, filenames), total=len(filenames), desc="decoding images", unit="img",
                 leave=False) as results:
        for i, (array, original, problem) in enumerate(results):
            if problem:
                failed.append(f"{filenames[i]} ({problem})")
                continue
            images[i] = array
            if original:
                resized.append(f"{filenames[i]} ({original[0]}x{original[1]})")
    if failed:
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise UserError(f"{image_dir}: {len(failed)} image(s) could not be read: {', '.join(failed[:3])}{more}")
    if resized:
        warn(f"{len(resized)} image(s) in {image_dir} were not {size}x{size} and were resized, e.g. {resized[0]}")
    return images


def cache_key(image_dir, filenames, size):
    """Changes whenever a file is added, removed, replaced or touched, so a changed dataset is re-decoded."""
    digest = hashlib.sha256(f"{Path(image_dir).resolve()}|{size}".encode())
    for name in filenames:
        try:
            stat = (image_dir / name).stat()
            digest.update(f"{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name}|missing\n".encode())
    return digest.hexdigest()[:20]


def cached_images(image_dir, filenames, cache_dir=DEFAULT_CACHE_DIR, size=IMAGE_SIZE):
    """The decoded uint8 array, from the cache when the dataset is unchanged; written atomically."""
    cache_file = Path(cache_dir) / f"images-{cache_key(image_dir, filenames, size)}.npy"
    if cache_file.is_file():
        try:
            images = np.load(cache_file, mmap_mode=None)
            if images.shape == (len(filenames), size, size, 3):
                return images
        except (OSError, ValueError):
            pass  # a damaged cache is simply rebuilt
    images = decode_images(image_dir, filenames, size)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache_file) as temp:
            np.save(temp, images)
    except OSError as error:
        warn(f"could not write the image cache {cache_file} ({error}); decoding again next time")
    return images


def write_pack(path, filenames, images, jpeg_quality=None):
    """Images (N, S, S, 3 uint8) and their filenames in one file, read back by load_training_set: exact (zlib), or
    with `jpeg_quality` as JPEG with full-resolution colour (4:4:4). The JPEG images stand side by side in strips,
    one header per strip instead of one per image (half the size of 64-pixel i-CLEVR images); with S a multiple of
    8, no 8x8 DCT block spans two images, so each decodes to the pixels its own JPEG file would."""
    arrays = {"filenames": np.array(filenames)}
    if jpeg_quality is None:
        arrays["images"] = images
    else:
        per_strip = JPEG_MAX_WIDTH // images.shape[2]
        strips = [jpeg_strip(images[start:start + per_strip], jpeg_quality)
                  for start in range(0, len(images), per_strip)]
        arrays.update(jpeg=np.frombuffer(b"".join(strips), np.uint8), jpeg_ends=np.cumsum([len(s) for s in strips]))
    with replacing(path) as temp:
        with open(temp, "wb") as f:
            np.savez_compressed(f, **arrays)


def jpeg_strip(images, quality):
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(list(images), axis=1)).save(buffer, "JPEG", quality=quality, subsampling=0,
                                                                optimize=True)
    return buffer.getvalue()


def unpack_jpeg(data, ends):
    """The images of a JPEG pack's strips, in order (each strip is S high, its images S wide)."""
    strips = [np.asarray(Image.open(io.BytesIO(data[start:end].tobytes())).convert("RGB"))
              for start, end in zip([0, *ends[:-1]], ends)]
    size = strips[0].shape[0]
    return np.stack([image for strip in strips for image in np.split(strip, strip.shape[1] // size, axis=1)])


def read_pack(path, filenames):
    """The packed images of `filenames`, in that order."""
    try:
        with np.load(path) as pack:
            names = pack["filenames"].tolist()
            images = unpack_jpeg(pack["jpeg"], pack["jpeg_ends"]) if "jpeg" in pack else pack["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnidentifiedImageError) as error:
        raise UserError(f"{path}: not a readable image pack ({str(error)[:120]})")
    position = {name: i for i, name in enumerate(names)}
    missing = [name for name in filenames if name not in position]
    if missing:
        raise UserError(f"{path}: {len(missing)} image(s) of train.json are not in it, e.g. {missing[0]}")
    return images[[position[name] for name in filenames]]


def load_training_set(data_dir, image_dir=None, train_json=None, vocabulary_path=None,
                      cache_dir=DEFAULT_CACHE_DIR, size=IMAGE_SIZE):
    """The course layout under `data_dir` (its images in iclevr/, or packed in iclevr.npz, perhaps at a lower
    resolution); each piece may be given separately instead."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir() and (image_dir is None or train_json is None):
        raise UserError(f"{data_dir}: no such data directory (expected iclevr/, train.json, objects.json; "
                        f"or use --data-dir {SYNTHETIC} for generated scenes)")
    packed = image_dir is None and not (data_dir / "iclevr").is_dir() and (data_dir / PACK).is_file()
    image_dir = Path(image_dir) if image_dir else data_dir / "iclevr"
    if not image_dir.is_dir() and not packed:
        raise UserError(f"{image_dir}: no such image folder")
    train_json = Path(train_json) if train_json else data_dir / "train.json"
    vocabulary = find_vocabulary(data_dir, vocabulary_path)
    mapping = read_json(train_json, "training label file")
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"{train_json}: expected a JSON object mapping image filenames to label lists")
    filenames = sorted(mapping)
    label_lists = [vocabulary.check(mapping[name], f"{train_json}: {name}") for name in filenames]
    images = read_pack(data_dir / PACK, filenames) if packed else cached_images(image_dir, filenames, cache_dir, size)
    labels = np.stack([vocabulary.encode(labels) for labels in label_lists])
    return TrainingSet(images, labels, filenames, label_lists, vocabulary, data_dir)


def to_model_input(images_uint8, flip=None):
    """(B, H, W, 3) uint8 tensor -> (B, 3, H, W) float in [-1, 1]; `flip` is a bool mask of images to mirror
    (labels carry no positions, so a mirrored scene has the same labels)."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def to_uint8(images):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 numpy, rounded as a PNG would store it."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def epoch_order(num_items, seed, epoch):
    """The same shuffled order for every process and every resume of an epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def batch_indices(num_items, batch_size, seed, step, rank=0, world_size=1):
    """Indices of global step `step` for process `rank`: a pure function of the step, so resuming needs no
    data-loader state. Each epoch drops its last incomplete batch."""
    steps_per_epoch = num_items // (batch_size * world_size)
    if steps_per_epoch == 0:
        raise UserError(f"batch size {batch_size} x {world_size} process(es) is larger than the "
                        f"{num_items} training images")
    epoch, position = divmod(step, steps_per_epoch)
    start = (position * world_size + rank) * batch_size
    return epoch_order(num_items, seed, epoch)[start:start + batch_size]


# ---------------------------------------------------------------------------------------------------------
# Composite scenes: one object more than the data shows

OBJECT_THRESHOLD = 24  # summed |RGB| change that marks a pixel as part of an added object or its shadow
FLOOR_TOLERANCE = 40  # largest summed |RGB| gap allowed between two scenes' floors around a pasted object


def added_objects(filenames, label_lists):
    """(before, after, label) for every image that adds one object to the image before it in its scene: the
    pixels that changed between the two are that object and its shadow."""
    position = {name: i for i, name in enumerate(filenames)}
    steps = []
    for after, name in enumerate(filenames):
        match = SCENE_PATTERN.match(name)  # SCENE_k.png follows SCENE_(k-1).png
        before = position.get(f"{match.group(1)}_{int(match.group(2)) - 1}.png") if match else None
        if before is None:
            continue
        added = set(label_lists[after]) - set(label_lists[before])
        if len(added) == 1 and len(label_lists[after]) == len(label_lists[before]) + 1:
            steps.append((before, after, added.pop()))
    return steps


def composite_scenes(data, count, seed=0, batch=256, pastes=1, shares=None):
    """`count` images of more objects than the data's largest scenes, as a TrainingSet: a largest-scene image with
    objects pasted in from other scenes, each at the place its own scene added it. i-CLEVR renders every scene
    from one camera under one light, so an object and its shadow fit wherever the floor under and around them
    matches in both scenes; a paste is kept only where it does (FLOOR_TOLERANCE), so it covers no object of the
    scene it joins, pasted ones included. Pasted labels are always new: labels do not repeat within a scene.
    With `pastes` > 1 the count is shared between 1, 2, ... `pastes` pasted objects (4, 5, 6 on i-CLEVR): each
    round pastes one object more into the composites of the round before. `shares` weighs the rounds (one weight
    per count of pasted objects; default even)."""
    steps = added_objects(data.filenames, data.label_lists)
    if not steps:
        raise UserError("composite scenes need each scene's images in order (NAME_0.png, NAME_1.png, ...), "
                        "one object added each time; this data has none")
    objects = data.labels.sum(1)
    largest = np.flatnonzero(objects == objects.max())
    base_images, base_labels = data.images[largest], [list(data.label_lists[i]) for i in largest]
    rng = np.random.default_rng(seed)
    images, label_lists = [], []
    with tqdm(total=count, desc="composite scenes", unit="img", leave=False) as bar:
        for pasted, share in enumerate(shared_out(count, shares or [1] * pastes), 1):
            base_images, base_labels = paste_objects(data, steps, base_images, base_labels, share, rng, batch, bar)
            if len(base_labels) < share:
                what = "their object" if pasted == 1 else (f"object {pasted} of {pastes} (the floor fills up: fewer "
                                                           f"--composite-pastes or more --composite-scenes)")
                raise UserError(f"only {len(base_labels)} of {share} composite scenes found a place to paste "
                                f"{what}")
            images.extend(base_images)
            label_lists.extend(base_labels)
    labels = np.stack([data.vocabulary.encode(names) for names in label_lists])
    filenames = [f"composite_{i:06d}.png" for i in range(count)]
    return TrainingSet(np.stack(images), labels, filenames, label_lists, data.vocabulary, data.data_dir)


def composite_flags_problem(scenes, pastes, shares):
    """What is wrong with --composite-scenes/--composite-pastes/--composite-shares, in one line; None if nothing."""
    if scenes < 0:
        return "--composite-scenes must be 0 (none) or more"
    if pastes < 1:
        return "--composite-pastes must be 1 or more"
    if shares is not None and len(shares) != pastes:
        return (f"--composite-shares has {len(shares)} weights for --composite-pastes {pastes}: give one for each "
                f"count of pasted objects")
    if shares is not None and min(shares) < 1:
        return "--composite-shares must be 1 or more each"
    if scenes and min(shared_out(scenes, shares or [1] * pastes)) < 1:
        return (f"--composite-scenes {scenes} is too few for --composite-pastes {pastes}: each count of pasted "
                f"objects needs a share")
    return None


def shared_out(count, weights):
    """`count` split in proportion to `weights`, the rounding's remainder going to the first: [9000, 3000, 3000]
    for 15000 and [3, 1, 1]; even weights split as np.array_split does."""
    counts = [count * weight // sum(weights) for weight in weights]
    for k in range(count - sum(counts)):
        counts[k] += 1
    return counts


def with_composite_scenes(data, count, seed, pastes=1, shares=None):
    """`data` and `count` composites pasted from its own scenes (train.py's and distill.py's --composite-scenes);
    `data` itself for 0."""
    return data.joined(composite_scenes(data, count, seed=seed, pastes=pastes, shares=shares)) if count else data


def paste_objects(data, steps, base_images, base_labels, count, rng, batch, bar):
    """Up to `count` of the bases, drawn at random, each with one object more: one of `steps` (added_objects)
    pasted where it fits. -> (uint8 images, label lists); fewer where few places fit"""
    grow = max(1, data.images.shape[1] // 21)  # the margin of floor that must match: 3 pixels at 64
    images, label_lists = [], []
    for _ in range(max(1, count) * 1000 // batch):  # about 1 paste in 8 fits: never loops for ever
        if len(images) >= count:
            break
        base = rng.choice(len(base_images), batch)
        before, after, label = zip(*(steps[i] for i in rng.integers(len(steps), size=batch)))
        chosen_images = base_images[base].astype(np.int16)
        before_images = data.images[list(before)].astype(np.int16)
        after_images = data.images[list(after)].astype(np.int16)
        changed = np.abs(after_images - before_images).sum(-1) > OBJECT_THRESHOLD
        mask = torch.from_numpy(changed)[:, None].float()
        around = torch.nn.functional.max_pool2d(mask, 2 * grow + 1, 1, grow)[:, 0].numpy() > 0
        floor_gap = np.where(around, np.abs(chosen_images - before_images).sum(-1), 0).max((1, 2))
        # soft edges: the changed pixels grown by one, then blurred by one
        alpha = torch.nn.functional.avg_pool2d(torch.nn.functional.max_pool2d(mask, 3, 1, 1), 3, 1, 1)
        alpha = alpha[:, 0, ..., None].numpy()
        for k in np.flatnonzero(changed.any((1, 2)) & (floor_gap < FLOOR_TOLERANCE)):
            if len(images) == count:
                break
            if label[k] in base_labels[base[k]]:
                continue
            pasted = chosen_images[k] * (1 - alpha[k]) + after_images[k] * alpha[k]
            images.append(np.clip(pasted, 0, 255).round().astype(np.uint8))
            label_lists.append(base_labels[base[k]] + [label[k]])
            bar.update()
    return np.stack(images) if images else base_images[:0], label_lists
