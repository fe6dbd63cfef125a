"""Synthetic i-CLEVR-like scenes, so the whole pipeline runs without the course files.

A small vectorised numpy ray caster: cubes, spheres and cylinders in the 8 CLEVR colours on a gray floor,
seen from CLEVR's camera, with ambient + diffuse shading, soft blob shadows and 2x2 supersampling. Like
i-CLEVR, the 3:2 camera frame is squeezed into 64x64, and each scene of N objects gives N images with the
first 1..N objects (SCENE_0.png, SCENE_1.png, ...), so held-out splits by scene work the same way.

    python synthetic.py --out synthetic-data --scenes 2000       # iclevr/, train.json, objects.json, ...
    python synthetic.py --labels "red sphere,cyan cube" --out-image scene.png
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cli import UserError, read_json, run_cli
from dataset import (DEFAULT_CACHE_DIR, DEFAULT_VOCABULARY, IMAGE_SIZE, SYNTHETIC, Vocabulary,
                     parse_label_string)

COLOURS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
           "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SHAPES = ("cube", "sphere", "cylinder")
CAMERA = np.array([7.36, -6.93, 4.96])  # CLEVR's camera, looking at the origin
HORIZONTAL_FOV = np.radians(49.1)
LIGHT = np.array([-0.45, -0.25, 0.86]) / np.linalg.norm([-0.45, -0.25, 0.86])
ARENA = 3.0  # objects stand in [-3, 3]^2, as in CLEVR
SUPERSAMPLE = 2
DEFAULT_SCENES = 2000  # what --data-dir synthetic generates: 6000 images
MIN_VISIBLE_FRACTION = 0.002  # of the image's subpixels, for every object, or the layout is drawn again


class Camera:
    """CLEVR's camera: one ray per subpixel of a 3:2 frame squeezed into a square image. The floor seen by
    each ray never changes, so its colour is computed once."""

    def __init__(self, size=IMAGE_SIZE, supersample=SUPERSAMPLE):
        forward = -CAMERA / np.linalg.norm(CAMERA)
        right = np.cross(forward, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        n = size * supersample
        half_width = np.tan(HORIZONTAL_FOV / 2)
        u = (np.arange(n) + 0.5) / n * 2 - 1
        x, y = np.meshgrid(u * half_width, -u * half_width * 2 / 3)
        rays = forward + x[..., None] * right + y[..., None] * up
        self.rays = (rays / np.linalg.norm(rays, axis=-1, keepdims=True)).reshape(-1, 3)
        self.t_floor = -CAMERA[2] / np.minimum(self.rays[:, 2], -1e-6)
        self.floor_points = CAMERA + self.t_floor[:, None] * self.rays
        self.floor_colour = floor_colour(self.floor_points)
        self.size, self.supersample = size, supersample

    def rays_near(self, centre, radius):
        """Indices of the rays that can hit a sphere of `radius` around `centre` (cheap culling)."""
        to_centre = centre - CAMERA
        distance = np.linalg.norm(to_centre)
        cos_limit = np.cos(np.arcsin(min(radius / distance, 1.0)))
        return np.flatnonzero(self.rays @ (to_centre / distance) > cos_limit)


def hit_sphere(d, centre, radius):
    oc = CAMERA - centre
    b = d @ oc
    disc = b * b - (oc @ oc - radius * radius)
    t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    normal = (CAMERA + t[:, None] * d - centre) / radius
    return t, normal


def hit_cylinder(d, centre, radius):
    """Vertical cylinder standing on the floor, height 2 * radius; side and top cap."""
    height = 2 * radius
    p = CAMERA[:2] - centre[:2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (d[:, :2] @ p)
    disc = b * b - 4 * a * (p @ p - radius * radius)
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    z = CAMERA[2] + t_side * d[:, 2]
    t_side = np.where((disc > 0) & (z >= 0) & (z <= height), t_side, np.inf)
    t_cap = (height - CAMERA[2]) / d[:, 2]
    xy = CAMERA[:2] + t_cap[:, None] * d[:, :2] - centre[:2]
    t_cap = np.where((t_cap > 0) & ((xy ** 2).sum(1) <= radius * radius), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    side_normal = np.concatenate([(CAMERA[:2] + t_side[:, None] * d[:, :2] - centre[:2]) / radius,
                                  np.zeros((len(d), 1))], axis=1)
    normal = np.where((t_cap < t_side)[:, None], [0.0, 0.0, 1.0], side_normal)
    return t, normal


def hit_cube(d, centre, half, angle):
    """Cube standing on the floor, rotated by `angle` about the vertical axis (slab method)."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])  # world -> cube frame
    o = rotation @ (CAMERA - centre)
    local = d @ rotation.T
    with np.errstate(divide="ignore"):
        inverse = 1.0 / local
    t1, t2 = (-half - o) * inverse, (half - o) * inverse
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = near.max(1), far.min(1)
    t = np.where((t_far >= t_near) & (t_far > 0), t_near, np.inf)
    axis = near.argmax(1)
    normal = np.zeros_like(local)
    normal[np.arange(len(d)), axis] = -np.sign(local[np.arange(len(d)), axis])
    return t, normal @ rotation  # back to the world frame


def hit(d, obj):
    centre = np.array([obj["x"], obj["y"], obj["size"]])
    if obj["shape"] == "sphere":
        return hit_sphere(d, centre, obj["size"])
    if obj["shape"] == "cylinder":
        return hit_cylinder(d, centre, obj["size"])
    return hit_cube(d, centre, obj["size"] * 0.85, obj["angle"])


def floor_colour(points):
    """Gray floor lit by a broad spot in front of the camera, darker towards the horizon (as in CLEVR)."""
    spot = np.exp(-((points[:, 0] - 2.5) ** 2 + (points[:, 1] + 2.0) ** 2) / 40.0)
    return (0.36 + 0.30 * spot)[:, None] * np.array([1.0, 0.99, 0.97])


def render(objects, camera, rng=None):
    """-> (uint8 image, visible fraction of the image per object)."""
    nearest, owner = camera.t_floor.copy(), np.full(len(camera.rays), -1)
    normals = np.zeros((len(camera.rays), 3))
    for i, obj in enumerate(objects):
        index = camera.rays_near(np.array([obj["x"], obj["y"], obj["size"]]), obj["size"] * 1.8)
        t, normal = hit(camera.rays[index], obj)
        closer = t < nearest[index]
        index = index[closer]
        nearest[index], owner[index], normals[index] = t[closer], i, normal[closer]
    colour = camera.floor_colour.copy()
    points = camera.floor_points
    for obj in objects:  # soft blob shadow cast away from the light
        offset = obj["size"] * 1.3 * LIGHT[:2] / np.linalg.norm(LIGHT[:2])
        dist2 = (points[:, 0] - obj["x"] + offset[0]) ** 2 + (points[:, 1] - obj["y"] + offset[1]) ** 2
        near = np.flatnonzero(dist2 < 10 * obj["size"] ** 2)
        colour[near] *= 1 - 0.45 * np.exp(-dist2[near] / (1.2 * obj["size"] ** 2))[:, None]
    for i, obj in enumerate(objects):
        index = np.flatnonzero(owner == i)
        diffuse = np.clip(normals[index] @ LIGHT, 0, 1)
        colour[index] = np.array(COLOURS[obj["colour"]]) / 255.0 * (0.45 + 0.65 * diffuse[:, None])
    size, s = camera.size, camera.supersample
    image = colour.reshape(size, s, size, s, 3).mean((1, 3)) * 255
    if rng is not None:
        image = image + rng.normal(0, 1.5, image.shape)  # the faint grain of the real renders
    visible = np.bincount(owner[owner >= 0], minlength=len(objects)) / len(owner)
    return np.clip(image, 0, 255).round().astype(np.uint8), visible


def split_label(label):
    colour, shape = label.split(" ")
    return colour, shape


def layout(labels, rng, max_tries=200):
    """Positions, sizes and cube rotations with no two objects overlapping."""
    for _ in range(max_tries):
        objects = []
        for label in labels:
            colour, shape = split_label(label)
            size = rng.uniform(0.35, 0.7)
            for _ in range(50):
                x, y = rng.uniform(-ARENA, ARENA, 2)
                if all(np.hypot(x - o["x"], y - o["y"]) > 1.45 * (size + o["size"]) + 0.1 for o in objects):
                    break
            else:
                break
            objects.append(dict(colour=colour, shape=shape, size=size, x=x, y=y, angle=rng.uniform(0, np.pi / 2)))
        if len(objects) == len(labels):
            return objects
    raise UserError(f"could not place {len(labels)} objects without overlap; use fewer objects")


def render_scene(labels, rng, camera):
    """All prefix images of one scene (1, 2, ..., len(labels) objects); every object visible in each."""
    for _ in range(50):
        objects = layout(labels, rng)
        images = [render(objects[:k], camera, rng) for k in range(1, len(objects) + 1)]
        if all(visible.min() >= MIN_VISIBLE_FRACTION for _, visible in images):
            return [image for image, _ in images]
    raise UserError(f"could not find a layout where all of {labels} are visible")


def check_object_count(max_objects, vocabulary):
    if max_objects < 1:
        raise UserError(f"--max-objects must be at least 1 (got {max_objects})")
    if max_objects > len(vocabulary):
        raise UserError(f"--max-objects {max_objects} is more than the {len(vocabulary)} labels "
                        f"(labels do not repeat within a scene)")
    if max_objects > 8:
        raise UserError(f"--max-objects {max_objects}: at most 8 objects fit on the floor")


def draw_labels(rng, vocabulary, count):
    return [vocabulary.names[i] for i in rng.choice(len(vocabulary), size=count, replace=False)]


def generate(out, scenes, max_objects=3, seed=0, conditions=32, vocabulary=None, progress=True):
    """Write the course layout to `out`: iclevr/, train.json, objects.json, test.json, new_test.json.
    Written into a temporary folder and moved into place, so `out` is complete or absent."""
    vocabulary = vocabulary or Vocabulary.load(DEFAULT_VOCABULARY)
    check_object_count(max_objects, vocabulary)
    if scenes < 1:
        raise UserError(f"--scenes must be at least 1 (got {scenes})")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    temp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    (temp / "iclevr").mkdir(parents=True)
    camera = Camera()
    labels = {}
    for scene in tqdm(range(scenes), desc="rendering scenes", unit="scene", disable=not progress):
        rng = np.random.default_rng([seed, scene])
        scene_labels = draw_labels(rng, vocabulary, max_objects)
        for k, image in enumerate(render_scene(scene_labels, rng, camera)):
            name = f"SYNTH_train_{scene:06d}_{k}.png"
            Image.fromarray(image).save(temp / "iclevr" / name, compress_level=1)
            labels[name] = scene_labels[:k + 1]
    (temp / "train.json").write_text(json.dumps(labels))
    (temp / "objects.json").write_text(json.dumps(vocabulary.index_of))
    for i, name in enumerate(("test.json", "new_test.json")):
        rng = np.random.default_rng([seed, 10**9 + i])
        sets = [draw_labels(rng, vocabulary, int(rng.integers(1, max_objects + 1))) for _ in range(conditions)]
        (temp / name).write_text(json.dumps(sets))
    os.rename(temp, out)
    return out


def ensure_dataset(cache_dir, scenes=None, max_objects=3, seed=0):
    """The cached synthetic set for these settings (DEFAULT_SCENES scenes unless told), made on first use."""
    scenes = scenes or DEFAULT_SCENES
    out = Path(cache_dir) / f"synthetic-{scenes}x{max_objects}-seed{seed}"
    if not (out / "train.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {scenes} synthetic scenes into {out}")
        generate(out, scenes, max_objects, seed)
    return out


def resolve_data_dir(data_dir, cache_dir=DEFAULT_CACHE_DIR):
    """--data-dir as given, or for `synthetic` the generated scenes (rendered once into the cache)."""
    return ensure_dataset(Path(cache_dir)) if data_dir == SYNTHETIC else data_dir


def write_comparison(data_dir, path, vocabulary, seed, count=32):
    """Side by side: `count` synthetic images and `count` real ones with 1-3 objects (8 per row)."""
    import torch
    from torchvision.utils import make_grid, save_image

    mapping = read_json(Path(data_dir) / "train.json", "training label file")
    rng = np.random.default_rng(seed)
    real_names = rng.choice(sorted(mapping), size=count, replace=False)
    real = [np.asarray(Image.open(Path(data_dir) / "iclevr" / name).convert("RGB")) for name in real_names]
    camera = Camera()
    fake = [render_scene(draw_labels(rng, vocabulary, int(rng.integers(1, 4))), rng, camera)[-1] for _ in range(count)]

    def grid(images):
        return make_grid(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, nrow=8, padding=2)

    left, right = grid(fake), grid(real)
    gap = torch.ones(3, left.shape[1], 12)
    save_image(torch.cat([left, gap, right], dim=2), path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="synthetic-data", help="dataset folder to create (must not exist)")
    p.add_argument("--scenes", type=int, default=DEFAULT_SCENES,
                   help="number of scenes (each gives MAX_OBJECTS images)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per scene, 1..8 (i-CLEVR: 3)")
    p.add_argument("--conditions", type=int, default=32, help="label sets in test.json and new_test.json")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--labels", help="instead of a dataset, draw one scene with these comma-separated labels")
    p.add_argument("--out-image", default="scene.png", help="where --labels writes its picture")
    p.add_argument("--benchmark", type=int, metavar="N", help="render N images and print images/s")
    p.add_argument("--compare", metavar="DATA_DIR",
                   help="write --out-image: 32 synthetic scenes (left) beside 32 real images from DATA_DIR (right)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    vocabulary = Vocabulary.load(DEFAULT_VOCABULARY)
    if args.labels is not None:
        labels = parse_label_string(args.labels, vocabulary)
        check_object_count(len(labels), vocabulary)
        image = render_scene(labels, np.random.default_rng(args.seed), Camera())[-1]
        Image.fromarray(image).save(args.out_image)
        print(f"wrote {args.out_image}")
    elif args.compare:
        write_comparison(args.compare, args.out_image, vocabulary, args.seed)
        print(f"wrote {args.out_image}")
    elif args.benchmark:
        check_object_count(args.max_objects, vocabulary)
        camera, rng, start, count = Camera(), np.random.default_rng(args.seed), time.perf_counter(), 0
        while count < args.benchmark:
            count += len(render_scene(draw_labels(rng, vocabulary, args.max_objects), rng, camera))
        print(f"{count / (time.perf_counter() - start):.1f} images/s ({count} images, one process)")
    else:
        generate(args.out, args.scenes, args.max_objects, args.seed, args.conditions, vocabulary)
        print(f"wrote {args.scenes * args.max_objects} images to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
