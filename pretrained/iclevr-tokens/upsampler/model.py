"""The conditional UNets, their presets, and the sampling pipeline.

Two ways in for the labels:
- `ConditionalUNet` (the report's): the multi-hot label vector through a learned projection added to the UNet's
  time embedding (`class_embed_type="identity"`: without a class embedding type, UNet2DModel silently ignores
  labels).
- `ObjectTokenUNet` (the CPU recipe): the same, plus one token per requested object (colour embedding + shape
  embedding) read by cross-attention (UNet2DConditionModel), which binds each colour to its shape.
The all-zero vector is the unconditional input for classifier-free guidance. `trained_objects` (in the config,
set by train.py) is the largest number of objects in a training image: the pipeline draws larger requests by
composing their sub-requests of that size (Composable Diffusion, Liu et al. 2022), since a label vector with more
objects than any training scene lies outside what the model has learned.

Either model may denoise at a lower resolution than it outputs (`sample_size` 32 for `image_size` 64): training
images are averaged down 2x2, and the pipeline upsamples its result: bicubic, or where the model folder has one
(upsampler.py adds it), the learned `Upsampler`. i-CLEVR's 64-pixel images carry about 32 pixels of detail, so
this makes every step 4x cheaper; but bicubic's slight blur costs a classifier trained on sharp images much
(docs/RESULTS.md), which the learned upsampler wins back.
"""
import inspect
import itertools
import json
import shutil
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       ImagePipelineOutput, ModelMixin, UNet2DConditionModel, UNet2DModel, UniPCMultistepScheduler)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# In a model folder that diffusers loads with trust_remote_code, the project's files lie beside this one as a
# package; in the project they are top-level modules. Each fallback stays on its except line, where
# diffusers' import check does not read it as a package to pip install.
try:
    from .cli import MANIFEST, UserError, manifest_problem, read_json, warn
except ImportError: from cli import MANIFEST, UserError, manifest_problem, read_json, warn  # noqa: E701
try:
    from .dataset import IMAGE_SIZE, Vocabulary
except ImportError: from dataset import IMAGE_SIZE, Vocabulary  # noqa: E701
try:
    from .sampling import MAX_COMPOSED, SAMPLERS, SamplingSettings, named_profile, read_sampling_json
except ImportError: from sampling import (MAX_COMPOSED, SAMPLERS, SamplingSettings, named_profile,  # noqa: E701
                                          read_sampling_json)

PRESETS = {
    # The report's model (diffusers' 64x64 example UNet): ~114M parameters, GPU only.
    "seed": dict(block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    # Four levels with attention at 16x16 and 8x8: a fast GPU model.
    "base": dict(block_out_channels=(96, 192, 288, 384), layers_per_block=2,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # ~3M parameters for a laptop CPU: space-to-depth pixels (32x32x12), attention at 8x8.
    "small": dict(fold=2, block_out_channels=(32, 64, 128), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    # The CPU recipe (docs/RESULTS.md): 4x4 space-to-depth (16x16x48), two levels; ~1.5x small's images/s.
    "cpu": dict(fold=4, block_out_channels=(64, 128), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # For tests: a training step in a fraction of a second.
    "tiny": dict(fold=2, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # Object tokens read by cross-attention at 16x16 and 8x8, denoising at 32x32 (~4.2M parameters).
    "tokens": dict(model="ObjectTokenUNet", sample_size=32, block_out_channels=(32, 64, 128), layers_per_block=1,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # The same for tests.
    "tiny-tokens": dict(model="ObjectTokenUNet", sample_size=32, block_out_channels=(16, 32), layers_per_block=1,
                        norm_num_groups=8, cross_attention_dim=32,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
# tokens at twice the width (~16.6M parameters), the shipped model: 4x the FLOPs of an image, but only 1.7x the
# time of a tokens step where both train in bf16 on a CPU with AMX (2.7x in fp32), and far more accurate per image
# seen (docs/RESULTS.md, "r8-wide-bf16", "bf16 on a CPU with AMX").
PRESETS["tokens-wide"] = dict(PRESETS["tokens"], block_out_channels=(64, 128, 256))


def label_projection(num_labels, width):
    """The multi-hot vector -> an addition to the time embedding."""
    return torch.nn.Sequential(torch.nn.Linear(num_labels, width), torch.nn.SiLU(), torch.nn.Linear(width, width))


def to_sample_size(images, size):
    """Training images at the model's denoising resolution: 2x2 (or kxk) averages, as a camera would bin them."""
    return images if images.shape[-1] == size else F.adaptive_avg_pool2d(images, size)


def bicubic(sample, size):
    """`sample` resized to size x size, bicubic (unclamped: it overshoots a little at edges)."""
    return F.interpolate(sample.float(), size=(size, size), mode="bicubic", align_corners=False)


def to_image_size(sample, size):
    """The denoised sample at the output resolution (bicubic, then clamped to the image range)."""
    if sample.shape[-1] == size:
        return sample
    return bicubic(sample, size).clamp(-1, 1)


class LabelledUNetMixin:
    """What the pipeline and the scripts need from either model: the vocabulary and the two resolutions."""

    @property
    def vocabulary(self):
        return Vocabulary({name: i for i, name in enumerate(self.config.label_names)}, source="the model")

    @property
    def denoising_size(self):
        return self.config.sample_size or self.config.image_size

    @property
    def distilled(self):
        """Whether this is a guidance-distilled student (distill.py): the guided output in one pass, the scale an
        input."""
        return getattr(self.config, "guidance_embedding_dim", None) is not None


class ConditionalUNet(LabelledUNetMixin, ModelMixin, ConfigMixin):
    """UNet2DModel + a label projection into its time embedding.

    `fold` > 1 runs the UNet on space-to-depth pixels (64x64x3 -> 32x32x12 for fold 2): four times fewer
    positions for the same output resolution.
    """

    @register_to_config
    def __init__(self, label_names=(), image_size=IMAGE_SIZE, sample_size=None, fold=1, preset=None,
                 block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                 up_block_types=("UpBlock2D",) * 2, attention_head_dim=8, norm_num_groups=32, dropout=0.0,
                 resnet_time_scale_shift="default", trained_objects=None):
        super().__init__()
        channels = 3 * fold * fold
        self.unet = UNet2DModel(
            sample_size=(sample_size or image_size) // fold, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, dropout=dropout,
            resnet_time_scale_shift=resnet_time_scale_shift, class_embed_type="identity")
        self.label_embedding = label_projection(len(label_names), block_out_channels[0] * 4)  # time-embedding width

    def forward(self, sample, timestep, labels):
        fold = self.config.fold
        x = F.pixel_unshuffle(sample, fold) if fold > 1 else sample
        out = self.unet(x, timestep, class_labels=self.label_embedding(labels.to(x.dtype)), return_dict=False)[0]
        return F.pixel_shuffle(out, fold) if fold > 1 else out


class ObjectTokenUNet(LabelledUNetMixin, ModelMixin, ConfigMixin):
    """UNet2DConditionModel reading one token per requested object by cross-attention, plus the label projection
    into its time embedding.

    A label "red sphere" is split into colour ("red") and shape ("sphere"); its token is the sum of their two
    embeddings, so every colour and every shape is learned from all the objects that have it. The tokens of a
    label set are padded with a learned null token to `max_objects` (the all-zero vector gives only null
    tokens: the unconditional input). Cross-attention has no positions, so the order of labels does not matter.

    `null_tokens` (None: max_objects) pads a request of k labels with max(null_tokens - k, 0) null tokens and
    masks the other slots out of cross-attention. A model trained with 4 tokens and given 6 (max_objects=6,
    null_tokens=4) then reads its 1-4-object requests exactly as before: more null tokens would draw attention
    away from the objects (the shipped model with 6 plain tokens fell from 0.983 to 0.776 on random:96:5).

    `guidance_embedding_dim` (None: an ordinary model) makes a guidance-distilled student (distill.py; Meng et al.
    2023): the guidance scale w is an input, a sinusoidal embedding of it added to the timestep's (diffusers'
    `time_cond_proj_dim`, as in its LCM models), and one pass gives what its teacher gives in two,
    eps_uncond + w * (eps_cond - eps_uncond). Its projection starts at zero: a new student is its teacher's
    conditional output at every w.
    """

    @register_to_config
    def __init__(self, label_names=(), image_size=IMAGE_SIZE, sample_size=32, preset=None,
                 block_out_channels=(32, 64, 128), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                 cross_attention_dim=128, max_objects=4, norm_num_groups=32, dropout=0.0, trained_objects=None,
                 null_tokens=None, guidance_embedding_dim=None):
        super().__init__()
        colours, shapes = zip(*(name.rsplit(" ", 1) if " " in name else (name, "") for name in label_names))
        colour_names, shape_names = sorted(set(colours)), sorted(set(shapes))
        self.register_buffer("colour_of", torch.tensor([colour_names.index(c) for c in colours]), persistent=False)
        self.register_buffer("shape_of", torch.tensor([shape_names.index(s) for s in shapes]), persistent=False)
        self.colour_embedding = torch.nn.Embedding(len(colour_names), cross_attention_dim)
        self.shape_embedding = torch.nn.Embedding(len(shape_names), cross_attention_dim)
        self.null_token = torch.nn.Parameter(torch.randn(cross_attention_dim))
        self.unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim, norm_num_groups=norm_num_groups, dropout=dropout,
            class_embed_type="identity", time_cond_proj_dim=guidance_embedding_dim)
        if guidance_embedding_dim is not None:
            torch.nn.init.zeros_(self.unet.time_embedding.cond_proj.weight)
        self.label_embedding = label_projection(len(label_names), block_out_channels[0] * 4)

    def guidance_embedding(self, guidance_scale, batch, dtype):
        """The scale(s) w, one number or one per sample, as the sinusoidal embedding of 1000 w (LCM's scaling: w
        then varies as much as the timestep does)."""
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=self.device).expand(batch)
        return get_timestep_embedding(scale * 1000, self.config.guidance_embedding_dim).to(dtype)

    def object_tokens(self, labels):
        """(B, num_labels) multi-hot -> (B, max_objects, cross_attention_dim)."""
        per_label = self.colour_embedding(self.colour_of) + self.shape_embedding(self.shape_of)
        present, index = labels.topk(self.config.max_objects, dim=1)
        return torch.where(present[..., None] > 0.5, per_label[index], self.null_token.to(per_label.dtype))

    def token_mask(self, labels):
        """(B, max_objects) 1 for the slots cross-attention reads (objects, then null_tokens' padding), 0 for the
        rest; None where every slot is read."""
        null_tokens, slots = self.config.null_tokens, self.config.max_objects
        if null_tokens is None or null_tokens >= slots:
            return None
        read = (labels > 0.5).sum(1, keepdim=True).clamp(min=null_tokens)
        return (torch.arange(slots, device=labels.device) < read).to(labels.dtype)

    def forward(self, sample, timestep, labels, guidance_scale=None):
        """guidance_scale: a distilled student's w (one number or one per sample; required for it, refused for an
        ordinary model)."""
        if (guidance_scale is not None) != self.distilled:
            raise ValueError("a guidance-distilled student needs guidance_scale; an ordinary model takes none")
        labels = labels.to(sample.dtype)
        guidance = None if guidance_scale is None else self.guidance_embedding(guidance_scale, len(sample),
                                                                                  sample.dtype)
        return self.unet(sample, timestep, encoder_hidden_states=self.object_tokens(labels).to(sample.dtype),
                         class_labels=self.label_embedding(labels), encoder_attention_mask=self.token_mask(labels),
                         timestep_cond=guidance, return_dict=False)[0]


MODEL_CLASSES = {cls.__name__: cls for cls in (ConditionalUNet, ObjectTokenUNet)}


def build_model(preset, label_names, **overrides):
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    options = {**PRESETS[preset], **overrides}
    model_class = MODEL_CLASSES.get(options.pop("model", "ConditionalUNet"))
    if model_class is None:
        raise UserError(f"unknown model class {overrides['model']!r} (choose from {', '.join(MODEL_CLASSES)})")
    unknown = set(options) - set(inspect.signature(model_class.__init__).parameters)
    if unknown:
        raise UserError(f"unknown model option(s) {', '.join(sorted(unknown))}")
    try:
        return model_class(label_names=list(label_names), preset=preset, **options)
    except (ValueError, TypeError) as error:
        raise UserError(f"invalid model options {overrides}: {str(error).splitlines()[0][:160]}")


class Upsampler(ModelMixin, ConfigMixin):
    """The denoised sample to the output resolution: bicubic plus a learned correction (a small CNN at the
    sample's resolution whose `scale`**2 output channels are shuffled into pixels). Its last layer starts at zero,
    so an untrained one is exactly bicubic. upsampler.py trains it on real images averaged down, which is what the
    UNet learns to generate."""

    @register_to_config
    def __init__(self, scale=2, width=48, depth=4):
        super().__init__()
        layers = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.SiLU()]
        for _ in range(depth):
            layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU()]
        layers.append(torch.nn.Conv2d(width, 3 * scale * scale, 3, padding=1))
        torch.nn.init.zeros_(layers[-1].weight)
        torch.nn.init.zeros_(layers[-1].bias)
        self.correction = torch.nn.Sequential(*layers)

    def forward(self, sample):
        scale = self.config.scale
        correction = F.pixel_shuffle(self.correction(sample), scale)
        return (bicubic(sample, sample.shape[-1] * scale) + correction).clamp(-1, 1)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Noise schedules and samplers


def training_scheduler(beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon"):
    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=names[beta_schedule],
                         prediction_type=prediction_type, clip_sample=True)


def prediction_target(scheduler, x0, noise, t):
    """What the UNet learns to predict from the noisy image at timestep t: the noise (epsilon), or the velocity
    sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (v-prediction)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


def clean_estimate(scheduler, output, t, x):
    """The clean image that the model's output at timestep t (one step for the whole batch) implies for the noisy
    image x, clamped to the image range: DDPM's and DDIM's pred_original_sample, the same for every sampler."""
    alpha_bar = scheduler.alphas_cumprod[int(t)].to(x.device, torch.float32)
    signal, noise = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return (signal * x - noise * output).clamp(-1, 1)
    return ((x - noise * output) / signal).clamp(-1, 1)


def sampling_scheduler(train_config, sampler):
    """A scheduler for `sampler` built from the training scheduler's config, so betas always match.

    Every sampler spaces its steps "trailing", so that the first one is the last training timestep (pure noise):
    with diffusers' default "leading" spacing, 20 steps start at t = 950 from an image that is not noise at all.
    DPM-Solver++ gets dynamic thresholding at 1.0 (without it, it diverged on a cosine-schedule model: pixel values
    ~1e4; DDPM/DDIM clip their x0 estimate by default) and, on the cosine schedule, the lambda clipping diffusers
    documents for squaredcos_cap_v2. UniPC (order 2, bh2, the setting its authors give for few steps on
    pixel-space guided models) gets the same thresholding.
    """
    spacing = {"timestep_spacing": "trailing"}
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_config, **spacing)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_config, **spacing)
    if sampler == "dpm++":
        cosine = {"lambda_min_clipped": -5.1} if train_config["beta_schedule"] == "squaredcos_cap_v2" else {}
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", thresholding=True,
                                                       sample_max_value=1.0, **spacing, **cosine)
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(train_config, solver_order=2, solver_type="bh2", thresholding=True,
                                                   sample_max_value=1.0, **spacing)
    raise UserError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")


class ICLEVRPipeline(DiffusionPipeline):
    """Label lists in, images out:

        pipe = ICLEVRPipeline.from_pretrained(run_dir / "model")
        pipe([["red sphere", "cyan cube"]], num_inference_steps=25, guidance_scale=2.0, generator=g).images
        pipe(label_lists, SamplingSettings("ddim", 20, guidance_scale=3.0, precision="bf16"), generator=g).images

    Guidance follows Ho & Salimans / diffusers: eps = eps_uncond + scale * (eps_cond - eps_uncond), so
    scale 1 is plain conditional sampling and 0 is unconditional. `guidance_max_t` guides only the steps at
    timesteps below it (the others take one conditional pass instead of two): the labels act at low noise on
    the i-CLEVR models (docs/RESULTS.md), so guiding only t < 500 costs a quarter less at the same accuracy.
    """

    _optional_components = ["upsampler"]

    def __init__(self, unet, scheduler, upsampler=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, upsampler=upsampler)

    def to_image(self, sample):
        """A denoised sample at the output resolution: the folder's learned upsampler, else bicubic."""
        sample = sample.clamp(-1, 1).float()
        if self.upsampler is None:
            return to_image_size(sample, self.unet.config.image_size)
        return self.upsampler(sample.to(self.upsampler.dtype)).float()

    def use_sampling_json(self, folder):
        """The SamplingSettings a model folder's sampling.json holds (the defaults where it has none), with its
        sampler set as this pipeline's scheduler. For a pipeline loaded by diffusers alone, one line:
            settings = pipe.use_sampling_json(folder); pipe(label_lists, settings, generator=g)"""
        settings = SamplingSettings.resolve(read_sampling_json(folder))
        self.scheduler = sampling_scheduler(self.scheduler.config, settings.sampler)
        return settings

    def label_vectors(self, conditions, compose_above="auto"):
        """Checked multi-hot rows for the requests; each may hold up to `max_objects` labels (the object-token
        model's tokens), or with composition (requests above `compose_above` labels; "auto": the model's
        trained_objects) up to MAX_COMPOSED."""
        if isinstance(conditions, torch.Tensor):
            return conditions.float()
        if compose_above == "auto":
            compose_above = self.default_compose_above()
        vocabulary = self.unet.vocabulary
        limit = MAX_COMPOSED if compose_above else getattr(self.unet.config, "max_objects", None)
        for i, labels in enumerate(conditions):
            vocabulary.check(list(labels), f"condition {i}")
            if limit is not None and len(labels) > limit:
                composes = compose_above and compose_above < limit  # a model trained on 6 draws all jointly
                how = f" ({compose_above} jointly, more by composing {compose_above}-object sub-requests)" \
                    if composes else ""
                raise UserError(f"condition {i}: {len(labels)} labels, but this model draws at most {limit} "
                                f"objects{how}")
        return vocabulary.encode_all([list(c) for c in conditions])

    def default_compose_above(self):
        """Requests above the largest training scene are composed; a model that does not know it never composes."""
        return getattr(self.unet.config, "trained_objects", None)

    def readable_objects(self, count):
        """The most labels of a request the UNet reads at once: all of them, or its object tokens' limit."""
        return min(count, getattr(self.unet.config, "max_objects", None) or count)

    def sub_requests(self, labels, compose_above, joint_weight=0.0):
        """The label vectors the UNet is asked for, one row each, the request each belongs to, and its weight in
        that request's conditional output: a request of at most `compose_above` labels is itself (joint sampling,
        as always, weight 1); a larger one is each of its subsets of `compose_above` labels, sharing the weight
        1 - joint_weight, and, for joint_weight > 0, the request read as whole as the UNet can (itself, or its
        subsets of max_objects labels) sharing joint_weight. -> (rows, owner, weights)"""
        rows, owner, weights = [], [], []

        def add(request, vector, subsets, weight):
            subsets = list(subsets)
            for subset in subsets:
                row = torch.zeros_like(vector)
                row[list(subset)] = vector[list(subset)]
                rows.append(row)
                owner.append(request)
                weights.append(weight / len(subsets))

        for request, vector in enumerate(labels):
            present = vector.nonzero().flatten().tolist()
            if not compose_above or len(present) <= compose_above:
                add(request, vector, [present], 1.0)
                continue
            add(request, vector, itertools.combinations(present, compose_above), 1.0 - joint_weight)
            if joint_weight:
                add(request, vector, itertools.combinations(present, self.readable_objects(len(present))),
                    joint_weight)
        return (torch.stack(rows), torch.tensor(owner, device=labels.device),
                torch.tensor(weights, device=labels.device))

    @staticmethod
    def request_guidance(labels, settings):
        """The Guidance (scale, max_t) of each request: that of its object count (SamplingSettings.guidance_for)."""
        return [settings.guidance_for(k) for k in (labels > 0).sum(1).tolist()]

    @staticmethod
    def step_guidance(guidance, t):
        """Each request's guidance scale at timestep t (1 outside its range): one number when they all agree, as
        without per-count settings, else a list."""
        scales = [scale if max_t is None or t < max_t else 1.0 for scale, max_t in guidance]
        return scales[0] if len(set(scales)) == 1 else scales

    def predict(self, x, t, rows, owner, weights, guidance_scale, precision="fp32"):
        """The UNet's output at t for each sample in x, as float32 (in bf16 autocast for precision "bf16"): the
        weighted sum of its sub-requests' outputs (`rows`, of sample `owner`, `weights` summing to 1 per sample;
        one per sample for joint sampling), guided as eps = eps_uncond + scale * (sum w eps_cond - eps_uncond),
        which for composed requests is Composable Diffusion's conjunction with the weight spread over the
        sub-requests. `guidance_scale`: one number, or one per sample (a sample at scale 1 then gets its
        conditional output exactly, as when no sample is guided). A distilled student gives each row's guided
        output in one pass; their weighted sum is the same conjunction, since the weights sum to 1."""
        joint = len(rows) == len(x)  # then owner is 0..n-1: the arithmetic of plain joint sampling, bit for bit
        inputs = x if joint else x[owner]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if self.unet.distilled:  # each row at its request's scale
                scales = torch.tensor(guidance_scale, device=x.device, dtype=torch.float32).expand(len(x))[owner]
                both = self.unet(inputs, t.expand(len(inputs)), rows, guidance_scale=scales)
            elif guidance_scale == 1.0:
                both = self.unet(inputs, t.expand(len(inputs)), rows)
            else:  # the sub-requests and every sample's unconditional input in one forward pass
                both = self.unet(torch.cat([inputs, x]), t.expand(len(inputs) + len(x)),
                                 torch.cat([rows, torch.zeros_like(rows[:len(x)])]))
        conditional, unconditional = both.float()[:len(inputs)], both.float()[len(inputs):]
        if not joint:
            weighted = conditional * weights.to(conditional.dtype)[:, None, None, None]
            conditional = torch.zeros_like(x, dtype=conditional.dtype).index_add_(0, owner, weighted)
        if guidance_scale == 1.0 or self.unet.distilled:
            return conditional
        if isinstance(guidance_scale, list):
            scale = torch.tensor(guidance_scale, device=x.device)[:, None, None, None]
            return torch.where(scale == 1.0, conditional, unconditional + scale * (conditional - unconditional))
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def __call__(self, conditions, settings=None, num_inference_steps=None, guidance_scale=None, generator=None,
                 output_type="pil", batch_size=64, callback=None, compose_above="auto"):
        """settings: a sampling.SamplingSettings (steps, guidance and its range, guidance per object count, joint
        weight, precision); its sampler is the scheduler this pipeline holds (prepare_pipeline sets it). Without
        it, diffusers' usual call: num_inference_steps (default: every training timestep) and guidance_scale
        (default 1), in fp32; with it, these two override its own.
        output_type: "pil", "np" (uint8 HxWx3) or "pt" (float Bx3xHxW in [-1, 1]).
        compose_above: requests with more labels are drawn by composing their sub-requests of this many labels
        ("auto": the model's trained_objects; None or 0: never). The settings' joint_weight is the share of a
        composed request's conditional output that reads the request whole (as far as the UNet reads: its
        max_objects tokens); the composed sub-requests share the rest (0: composition alone).
        callback(step_index, timestep, sample, clean_estimate) sees, before each step, the noisy sample the model
        denoises at that timestep and the model's estimate of the clean image from it, both at the denoising
        resolution (for the process figure)."""
        settings = settings or SamplingSettings(steps=self.scheduler.config.num_train_timesteps)
        overrides = {"steps": num_inference_steps, "guidance_scale": guidance_scale}
        settings = settings.replace(**{key: value for key, value in overrides.items() if value is not None})
        if compose_above == "auto":
            compose_above = self.default_compose_above()
        labels = self.label_vectors(conditions, compose_above).to(self.device)
        size = self.unet.denoising_size
        noise = randn_tensor((len(labels), 3, size, size), generator=generator, device=self.device,
                             dtype=self.unet.dtype)
        images = []
        for start in range(0, len(labels), batch_size):
            x = noise[start:start + batch_size]
            rows, owner, weights = self.sub_requests(labels[start:start + batch_size], compose_above,
                                                     settings.joint_weight)
            rows = rows.to(self.unet.dtype)
            guidance = self.request_guidance(labels[start:start + batch_size], settings)
            self.scheduler.set_timesteps(settings.steps, device=self.device)
            # the stochastic samplers take the generator; UniPC's step is deterministic and has no such argument
            takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
            step_kwargs = {"generator": generator} if takes_generator else {}
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                output = self.predict(x, t, rows, owner, weights, self.step_guidance(guidance, t), settings.precision)
                if callback is not None:
                    callback(i, t, x, clean_estimate(self.scheduler, output, t, x))
                x = self.scheduler.step(output, t, x, **step_kwargs).prev_sample
            images.append(self.to_image(x))
        images = torch.cat(images)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        array = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=array if output_type == "np" else [Image.fromarray(a) for a in array])


BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}  # Intel AMX; AMD Zen 4 and later: 1.8x fp32's sampling speed here


def fast_bf16(device_type):
    """Whether bf16 arithmetic runs fast here: a CUDA GPU that supports it, or a CPU with bf16 instructions
    (AMX-BF16 or AVX512-BF16; elsewhere PyTorch emulates it on a CPU, slower than fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return any(BF16_CPU_FLAGS & set(line.split()) for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return False


def find_model_dir(path):
    """An exported model folder, or a run folder (its model/) or a checkpoint (its pipeline/)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model folder (train one with train.py; it exports RUN/model)")
    for candidate in (path, path / "model", path / "pipeline"):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise UserError(f"{path}: not a model folder (no model_index.json); pass RUN/model, a run folder or "
                    f"a checkpoint folder RUN/checkpoints/step-N")


def load_pipeline(path, device="cpu"):
    """-> ICLEVRPipeline in float32 (a shipped folder may hold fp16 weights), with one-line errors for what is
    missing or foreign. `pipe.sampling_settings` holds the folder's sampling.json (sampling.read_sampling_json; {}
    without one)."""
    path = find_model_dir(path)
    problem = manifest_problem(path) if (path / MANIFEST).is_file() else None  # folders without one still load
    if problem is not None:
        raise UserError(f"{path} is damaged ({problem})")
    index = read_json(path / "model_index.json", "pipeline index")
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if (kind[-1] if isinstance(kind, list) else kind) != ICLEVRPipeline.__name__:
        raise UserError(f"{path}: a {kind} folder, not an {ICLEVRPipeline.__name__}")
    try:  # the project's own classes, never the code the folder carries for diffusers alone (FOLDER_CODE)
        pipe = ICLEVRPipeline(**{name: load_component(path, name, index[name]) for name in
                                 ("unet", "scheduler", "upsampler") if index.get(name, [None])[0] is not None})
    except (OSError, ValueError, TypeError, AttributeError, KeyError, SafetensorError) as error:
        raise UserError(f"{path}: cannot load the model ({str(error).splitlines()[0][:160]})")
    upsampler, unet = pipe.upsampler, pipe.unet
    if upsampler is not None and unet.denoising_size * upsampler.config.scale != unet.config.image_size:
        raise UserError(f"{path}: its upsampler scales by {upsampler.config.scale}, but the UNet denoises at "
                        f"{unet.denoising_size} pixels for {unet.config.image_size}-pixel images")
    pipe = pipe.to(device)
    pipe.unet.eval()
    pipe.set_progress_bar_config(leave=False)
    pipe.sampling_settings = read_sampling_json(path)
    return pipe


FOLDER_CODE = ("model.py", "sampling.py", "dataset.py", "cli.py")  # what a folder carries to load without us


def add_folder_code(folder):
    """Let `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` load a model folder without this
    project: its own files (FOLDER_CODE), byte for byte, at the top (for the pipeline) and in each folder of a
    component of this project's classes (diffusers reads a component's code from its own folder), and the index
    naming the pipeline's file. load_pipeline never runs them: it builds the project's own classes."""
    here, folder = Path(__file__).resolve().parent, Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    places = [folder] + [folder / name for name, entry in index.items()
                         if isinstance(entry, list) and entry[0] == Path(FOLDER_CODE[0]).stem]
    for place in places:
        for name in FOLDER_CODE:
            shutil.copyfile(here / name, place / name)
    index["_class_name"] = [Path(FOLDER_CODE[0]).stem, ICLEVRPipeline.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_component(path, name, entry):
    """One component of a model folder, with this project's class for its own (the UNets, the upsampler) and
    diffusers' for a scheduler; float32 weights."""
    library, class_name = entry
    if library == "diffusers":
        return getattr(diffusers, class_name).from_pretrained(str(path / name))  # configs keep it: JSON
    own = {**MODEL_CLASSES, Upsampler.__name__: Upsampler}
    if class_name not in own:
        raise ValueError(f"unknown component {name}: {library}.{class_name}")
    return own[class_name].from_pretrained(str(path / name), torch_dtype=torch.float32)


def pick_device(name=None):
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here (use --device cpu)")
    return name


def prepare_pipeline(model, device="cpu", **flags):
    """The pipeline with its sampler, and the SamplingSettings to sample with (SamplingSettings.resolve: each flag,
    then the model folder's sampling.json, then the defaults); the flags are checked before the model is loaded.
    bf16 where the hardware has no fast bf16 (a CPU without AMX-BF16 or AVX512-BF16) is fp32, with a note.
    -> (pipe, settings)"""
    profile = flags.pop("profile", None)
    SamplingSettings.resolve({}, **flags)
    pipe = load_pipeline(model, pick_device(device))
    if profile is None:
        settings = SamplingSettings.resolve(pipe.sampling_settings, **flags)
    else:
        settings = profile_settings(pipe, model, profile, **flags)
        own_unet = find_model_dir(model) / PROFILE_UNET.format(profile)
        if own_unet.is_file():  # e.g. a fast profile's distilled student
            pipe.unet = with_unet_difference(pipe.unet, own_unet)
    settings = runnable_here(settings, pipe.device.type)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, settings.sampler)
    return pipe, settings


PROFILE_UNET = "{}.unet.safetensors"  # a profile's own UNet (a distilled student), as its difference


def unet_difference(unet, base, rank=None):
    """What `unet`, a student of `base` (distill.py), changes in it: {name: fp16 tensor} for each weight that
    differs in fp16 (or is new), and the config entries that differ. With `rank`, a changed weight matrix (or
    convolution, flattened to out x rest) is stored as the rank-`rank` factors of its change where they are smaller
    (low_rank_change): a full student's 33 MB become a few."""
    if type(unet) is not type(base):
        raise UserError(f"a {type(unet).__name__} is no student of a {type(base).__name__}")
    mine, theirs = unet.state_dict(), base.state_dict()
    foreign = [name for name in theirs if name not in mine or mine[name].shape != theirs[name].shape]
    if foreign:
        raise UserError(f"its UNet has other weights than the base's ({foreign[0]}): not a student of it")
    changed = {}
    for name, tensor in mine.items():
        if name in theirs and torch.equal(tensor.half(), theirs[name].half()):
            continue
        factors = None if rank is None or name not in theirs else low_rank_change(tensor - theirs[name], rank)
        if factors is None:
            changed[name] = tensor.detach().to(torch.float16).contiguous()
        else:
            changed[name + LOW_RANK_UP], changed[name + LOW_RANK_DOWN] = factors
    config = {key: value for key, value in unet.config.items()
              if not key.startswith("_") and base.config.get(key) != value}
    return changed, config


LOW_RANK_UP, LOW_RANK_DOWN = ".low_rank_up", ".low_rank_down"  # a weight's change as up @ down


def low_rank_change(change, rank):
    """The best rank-`rank` approximation of `change` (flattened to out x rest) as fp16 (up, down), up @ down; None
    for a vector, or where the factors would hold no fewer numbers than the change."""
    matrix = change.detach().float().flatten(1) if change.dim() > 1 else None
    if matrix is None or rank * sum(matrix.shape) >= matrix.numel():
        return None
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]).half().contiguous(), vh[:rank].half().contiguous()


def save_unet_difference(difference, path):
    changed, config = difference
    save_file(changed, str(path), metadata={"config": json.dumps(config)})


def with_unet_difference(base, path):
    """`base`'s UNet with the difference at `path` (save_unet_difference) applied: a new UNet of the changed
    config, base's weights, the file's over them (a low-rank change added to base's weight)."""
    try:
        with safe_open(str(path), "pt") as stored:
            config = json.loads(stored.metadata()["config"])
            changed = {name: stored.get_tensor(name) for name in stored.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as error:
        raise UserError(f"{path}: not a profile's UNet ({str(error).splitlines()[0][:120]})")
    weights = base.state_dict()
    for up_name in [name for name in changed if name.endswith(LOW_RANK_UP)]:
        weight = up_name[:-len(LOW_RANK_UP)]
        up, down = changed.pop(up_name), changed.pop(weight + LOW_RANK_DOWN, None)
        if weight not in weights or down is None:
            raise UserError(f"{path}: does not fit the folder's UNet ({weight})")
        change = (up.float() @ down.float()).reshape(weights[weight].shape)
        weights[weight] = (weights[weight].float() + change.to(weights[weight].device)).to(weights[weight].dtype)
    unet = type(base).from_config({**base.config, **config})
    missing, unexpected = unet.load_state_dict({**weights, **changed}, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not fit the folder's UNet ({(missing or unexpected)[0]})")
    return unet.to(base.device).eval()


def profile_settings(pipe, model, profile, **flags):
    """The settings of the folder's named profile, merged with the flags; a bad value in it is a one-line error
    that names the profile."""
    saved = named_profile(pipe.sampling_settings, profile)
    try:
        return SamplingSettings.resolve(saved, **flags)
    except UserError as error:  # the flags were checked already: the profile holds the bad value
        raise UserError(f"{find_model_dir(model)}/sampling.json, profile {profile!r}: {error}")


def runnable_here(settings, device_type):
    """bf16 where this hardware has no fast bf16 (a CPU without AMX-BF16 or AVX512-BF16) becomes fp32, with a
    note: emulated bf16 is slower than fp32."""
    if settings.precision == "bf16" and not fast_bf16(device_type):
        warn(f"this {device_type.upper()} has no fast bf16 (AMX-BF16 or AVX512-BF16 on a CPU): sampling in fp32")
        return settings.replace(precision="fp32")
    return settings


def generate(pipe, label_lists, settings=None, seed=0, batch_size=64, callback=None, compose_above="auto"):
    """uint8 images (N, 64, 64, 3) drawn with `settings` (a SamplingSettings; None: the pipeline's plain call);
    the same seed and settings give the same images. Requests with more labels than `compose_above` ("auto": the
    model's largest training scene) are composed of sub-requests."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
    return pipe(label_lists, settings, generator=generator, output_type="np", batch_size=batch_size,
                callback=callback, compose_above=compose_above).images
