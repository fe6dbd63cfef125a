"""Sampling settings: one frozen object for what sample.py, evaluate.py, export.py, train.py's evaluation and a
model folder's sampling.json say about drawing images.

`SamplingSettings` holds the sampler, steps, guidance scale and range, the guidance per object count, the joint
weight of composed requests and the precision. It checks itself when made; `to_json` / `read_sampling_json` are
its sampling.json form; `SamplingSettings.resolve` merges flags with a folder's sampling.json (each flag first,
then the folder's, then the defaults); `add_sampling_flags` / `sampling_flags` are the command-line flags that
set it (with a prefix for train.py's --eval-*). The pipeline (model.ICLEVRPipeline) takes the object as it is.
"""
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

# In a model folder that diffusers loads with trust_remote_code, the project's files lie beside this one as a
# package; in the project they are top-level modules. Each fallback stays on its except line, where
# diffusers' import check does not read it as a package to pip install.
try:
    from .cli import UserError, read_json
except ImportError: from cli import UserError, read_json  # noqa: E701

SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 25, "unipc": 25}
# For a folder without sampling.json. Not dpm++: on epsilon models with linear betas (the default schedule)
# its samples carry a strong colour cast and score at chance (docs/RESULTS.md); not ddpm: 1000 steps are
# minutes per grid on a CPU.
DEFAULT_SAMPLER = "ddim"
MAX_COMPOSED = 6  # the most objects one request may ask for when composition draws it (measured up to 6)
PRECISIONS = ("fp32", "bf16")  # the UNet's arithmetic while sampling (bf16: autocast)
MAX_GUIDANCE = 20.0
SAMPLING_FILE = "sampling.json"  # in a model folder: the settings it was measured with
FOLDER_DEFAULT = "the model folder's sampling.json"  # where an unset sampling flag's value comes from


class Guidance(NamedTuple):
    """Classifier-free guidance: the scale, on the steps at timesteps below max_t (None: every step)."""
    scale: float
    max_t: int | None = None

    def describe(self):
        """'guidance 3' or 'guidance 3 below t=500'."""
        return f"guidance {self.scale:g}" + ("" if self.max_t is None else f" below t={self.max_t}")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to draw images; checked when made (one-line errors naming the flag). `steps` None: the sampler's
    default. `guidance_by_objects`: {K: Guidance} for requests of K labels that differ from the common guidance
    (a mapping of counts to Guidance or (scale, max_t) is accepted, and kept sorted by count)."""
    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    guidance_scale: float = 1.0
    guidance_max_t: int | None = None
    guidance_by_objects: tuple = ()
    joint_weight: float = 0.0
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.sampler])
        if not 1 <= self.steps <= 1000:
            raise UserError(f"--steps must be between 1 and 1000 (got {self.steps})")
        if not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise UserError(f"--guidance-scale must be between 0 and {MAX_GUIDANCE:g} (got {self.guidance_scale:g}; "
                            f"1 means no guidance)")
        if self.guidance_max_t is not None and not 0 <= self.guidance_max_t <= 1000:
            raise UserError(f"--guidance-max-t must be between 0 and 1000 (got {self.guidance_max_t}; 1000 guides "
                            f"every step)")
        if not 0 <= self.joint_weight <= 1:
            raise UserError(f"--joint-weight must be between 0 and 1 (got {self.joint_weight:g}; 0: composition "
                            f"alone)")
        by_objects = dict(self.guidance_by_objects or ())
        for count, (scale, max_t) in by_objects.items():
            if not (1 <= int(count) <= MAX_COMPOSED and 0 <= scale <= MAX_GUIDANCE
                    and (max_t is None or 0 <= max_t <= 1000)):
                raise UserError(f"--guidance-by-objects {count}:{scale:g}{'' if max_t is None else f':{max_t}'}: K "
                                f"must be between 1 and {MAX_COMPOSED}, SCALE between 0 and {MAX_GUIDANCE:g}, MAX_T "
                                f"between 0 and 1000")
        object.__setattr__(self, "guidance_by_objects", tuple(sorted(
            (int(count), Guidance(float(scale), max_t)) for count, (scale, max_t) in by_objects.items())))

    def guidance_for(self, count):
        """The Guidance of a request of `count` labels: its own entry, else the common one."""
        return dict(self.guidance_by_objects).get(count, Guidance(self.guidance_scale, self.guidance_max_t))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def describe(self):
        """'ddim, 20 steps, guidance 3, bf16', for printed summaries."""
        return f"{self.sampler}, {self.steps} steps, {self.describe_guidance()}, {self.precision}"

    def describe_guidance(self):
        """'guidance 3', 'guidance 3 below t=500' or 'guidance 3 below t=500; 4 objects: guidance 2'."""
        return "; ".join([Guidance(self.guidance_scale, self.guidance_max_t).describe()] +
                         [f"{count} objects: {guidance.describe()}" for count, guidance in self.guidance_by_objects])

    def to_json(self):
        """As sampling.json holds it: guidance_max_t only when guidance is limited, guidance_by_objects only when
        there is one ({"K": {"guidance_scale": ..., "guidance_max_t": ...}}), joint_weight only when not 0,
        precision only when not fp32."""
        settings = {"sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale}
        if self.guidance_max_t is not None:
            settings["guidance_max_t"] = self.guidance_max_t
        if self.guidance_by_objects:
            settings["guidance_by_objects"] = {
                str(count): {"guidance_scale": scale, **({} if max_t is None else {"guidance_max_t": max_t})}
                for count, (scale, max_t) in self.guidance_by_objects}
        if self.joint_weight:
            settings["joint_weight"] = self.joint_weight
        return settings if self.precision == "fp32" else {**settings, "precision": self.precision}

    def write(self, folder, profiles=None):
        """sampling.json: these settings (the default profile), and `profiles` ({name: SamplingSettings}) beside
        them."""
        settings = self.to_json()
        if profiles:
            settings["profiles"] = {name: profile.to_json() for name, profile in sorted(profiles.items())}
        (Path(folder) / SAMPLING_FILE).write_text(json.dumps(settings, indent=1) + "\n")

    @classmethod
    def resolve(cls, saved, sampler=None, steps=None, guidance_scale=None, guidance_max_t=None, precision=None,
                guidance_by_objects=None, joint_weight=None, profile=None):
        """The settings to sample with: each explicit value first, then what the model folder was measured with
        (`saved`, its sampling.json as read_sampling_json gives it, or its named `profile`; its steps only with its
        own sampler), then the defaults (DEFAULT_SAMPLER, DEFAULT_STEPS, guidance 1 at every step and for every
        object count, composition alone, fp32)."""
        if profile is not None:
            saved = named_profile(saved, profile)
        sampler = sampler or saved.get("sampler", DEFAULT_SAMPLER)
        if steps is None and saved.get("sampler") == sampler:
            steps = saved.get("steps")
        if guidance_by_objects is None:
            guidance_by_objects = {int(count): (entry["guidance_scale"], entry.get("guidance_max_t"))
                                   for count, entry in saved.get("guidance_by_objects", {}).items()}
        return cls(sampler, steps,
                   float(saved.get("guidance_scale", 1.0)) if guidance_scale is None else guidance_scale,
                   saved.get("guidance_max_t") if guidance_max_t is None else guidance_max_t,
                   guidance_by_objects,
                   float(saved.get("joint_weight", 0.0)) if joint_weight is None else joint_weight,
                   precision or saved.get("precision", "fp32"))


def named_profile(saved, name):
    """A sampling.json's named profile (--profile NAME), in the form of the file's top level."""
    profiles = saved.get("profiles", {})
    if name not in profiles:
        have = f"it has: {', '.join(sorted(profiles))}" if profiles else "it has none"
        raise UserError(f"--profile {name}: the model folder's sampling.json has no such profile ({have})")
    return profiles[name]


def read_sampling_json(folder):
    """The folder's sampling.json, its types checked: {"sampler": ..., "steps": ..., "guidance_scale": ...,
    "guidance_max_t": ..., "precision": ..., "guidance_by_objects": {"K": {"guidance_scale": ...,
    "guidance_max_t": ...}}, "joint_weight": ..., "profiles": {NAME: {the same}}}, each optional ({} without the
    file). Ranges are checked when SamplingSettings.resolve merges it with the flags."""
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return {}
    settings = read_json(path, "sampling settings file")
    profiles = settings.get("profiles", {}) if isinstance(settings, dict) else {}
    if not (isinstance(profiles, dict) and all(isinstance(p, dict) for p in profiles.values())):
        raise UserError(f'{path}: "profiles" must map names to settings like the top level\'s')
    checked = checked_settings(settings, path)
    if profiles:
        checked["profiles"] = {name: checked_settings(profile, f"{path}, profile {name!r}")
                               for name, profile in profiles.items()}
    return checked


def checked_settings(settings, path):
    """One level of a sampling.json (the top, or a profile), its types checked."""
    expected = {"sampler": str, "steps": int, "guidance_scale": (int, float), "guidance_max_t": int, "precision": str,
                "guidance_by_objects": dict, "joint_weight": (int, float)}
    if not isinstance(settings, dict) or any(k in settings and not isinstance(settings[k], kind)
                                             for k, kind in expected.items()):
        raise UserError(f'{path}: expected {{"sampler": name, "steps": integer, "guidance_scale": number, '
                        f'"guidance_max_t": integer, "precision": "fp32" or "bf16", "guidance_by_objects": '
                        f'{{"K": {{"guidance_scale": number, "guidance_max_t": integer}}}}, "joint_weight": number}} '
                        f'(each optional)')
    for count, entry in settings.get("guidance_by_objects", {}).items():
        if not (count.isdigit() and isinstance(entry, dict) and isinstance(entry.get("guidance_scale"), (int, float))
                and set(entry) <= {"guidance_scale", "guidance_max_t"}
                and isinstance(entry.get("guidance_max_t", 0), int)):
            raise UserError(f'{path}: guidance_by_objects["{count}"]: expected {{"guidance_scale": number, '
                            f'"guidance_max_t": integer}} for requests of a number of labels (guidance_max_t '
                            f'optional: every step)')
    return {k: settings[k] for k in expected if k in settings}


def parse_guidance_by_objects(texts):
    """--guidance-by-objects K:SCALE[:MAX_T] ... -> {K: Guidance}; None without the flag."""
    if not texts:
        return None
    settings = {}
    for text in texts:
        try:
            count, scale, *max_t = text.split(":")
            if len(max_t) > 1:
                raise ValueError(text)
            settings[int(count)] = Guidance(float(scale), int(max_t[0]) if max_t else None)
        except ValueError:
            raise UserError(f"--guidance-by-objects {text}: expected K:SCALE or K:SCALE:MAX_T, e.g. 4:2 (requests of "
                            f"4 labels at guidance 2 on every step)")
    return settings


def add_sampling_flags(parser, default_from=FOLDER_DEFAULT, compose=True, prefix="", precision_default="fp32",
                       profiles=False):
    """The sampling flags, with one help text each: sampler, steps, guidance scale and range, guidance per object
    count, joint weight, precision, (with `compose`) the composition threshold and (with `profiles`) the model
    folder's named profile. Unset, each is None:
    `default_from` (a model folder's sampling.json; None: no folder), then the defaults (SamplingSettings.resolve).
    `prefix` ("eval-") names them --eval-sampler, ... for train.py's evaluation."""
    def flag(name, *aliases, **options):
        parser.add_argument(f"--{prefix}{name}", *(f"--{prefix}{alias}" for alias in aliases), **options)

    def default(value):
        return f"(default: {default_from}, else {value})" if default_from else f"(default: {value})"

    steps = ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items())
    if profiles:
        flag("profile", metavar="NAME",
             help="sample with the model folder's named profile (sampling.json \"profiles\", e.g. fast: fewer "
                  "steps) instead of its default settings; the flags below still override it (default: the "
                  "folder's default settings, its most accurate)")
    flag("sampler", choices=SAMPLERS,
         help="ddpm: the full 1000-step ancestral chain (the report's); ddim; dpm++ (DPM-Solver++; at chance on "
              "epsilon models with linear betas); unipc (UniPC, order 2, bh2: a predictor-corrector for few "
              f"steps) {default(DEFAULT_SAMPLER)}")
    flag("steps", type=int, help=f"denoising steps {default(steps)}" +
                                 ("; the folder's only with its own sampler" if default_from else ""))
    flag("guidance-scale", *(["guidance"] if prefix else []), type=float,
         help="classifier-free guidance scale: 1 = none, 0 = unconditional, >1 = stronger labels "
              + default(1))
    flag("guidance-max-t", type=int,
         help="guide only the steps at timesteps below this (of 1000), one pass instead of two at the others; 1000 "
              "guides every step " + default("every step"))
    flag("guidance-by-objects", nargs="+", metavar="K:SCALE[:MAX_T]",
         help="a guidance of its own for requests of K labels, e.g. 4:2 (four-label requests at scale 2 on every "
              "step) or 3:4:500 (scale 4 below t=500); other requests keep the guidance scale and range "
              + default("none"))
    flag("precision", choices=PRECISIONS,
         help="the UNet's arithmetic while sampling: bf16 (autocast) is faster where the hardware has it (AMX-BF16 "
              "or AVX512-BF16 on a CPU, most GPUs), fp32 elsewhere; an evaluator always scores in fp32 "
              + default(precision_default))
    flag("joint-weight", type=float, metavar="W",
         help="for a composed request, the share of its conditional output that reads the request whole (as far as "
              "the model reads: its object tokens), the rest shared by its sub-requests; 0: composition alone "
              + default(0))
    if compose:
        flag("compose-above", type=int, metavar="N",
             help="draw requests of more than N labels by composing their N-label sub-requests, one batched pass per "
                  "step (default: the largest scene the model was trained on, 4 for the shipped model, so that 5 "
                  "and 6 objects can be asked for; 0: never, joint sampling of every request)")


def compose_threshold(args, prefix=""):
    """--compose-above as the pipeline takes it: "auto" where unset (the model's largest training scene)."""
    value = getattr(args, prefix.replace("-", "_") + "compose_above")
    return "auto" if value is None else value


def sampling_flags(args, prefix=""):
    """The values of add_sampling_flags' flags, as SamplingSettings.resolve takes them (None where unset)."""
    def value(name):
        return getattr(args, prefix.replace("-", "_") + name)

    flags = {"sampler": value("sampler"), "steps": value("steps"), "guidance_scale": value("guidance_scale"),
             "guidance_max_t": value("guidance_max_t"), "precision": value("precision"),
             "guidance_by_objects": parse_guidance_by_objects(value("guidance_by_objects")),
             "joint_weight": value("joint_weight")}
    return {**flags, "profile": value("profile")} if hasattr(args, prefix.replace("-", "_") + "profile") else flags
