"""The conditional UNet, its presets, and the sampling pipeline.

The multi-hot label vector enters through a learned projection added to the UNet's time embedding
(`class_embed_type="identity"`: without a class embedding type, UNet2DModel silently ignores labels).
The all-zero vector is the unconditional input for classifier-free guidance.
"""
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       ImagePipelineOutput, ModelMixin, UNet2DModel)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from dataset import IMAGE_SIZE, UserError, Vocabulary

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
}


class ConditionalUNet(ModelMixin, ConfigMixin):
    """UNet2DModel + a label projection into its time embedding.

    `fold` > 1 runs the UNet on space-to-depth pixels (64x64x3 -> 32x32x12 for fold 2): four times fewer
    positions for the same output resolution.
    """

    @register_to_config
    def __init__(self, label_names=(), image_size=IMAGE_SIZE, fold=1, preset=None,
                 block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                 up_block_types=("UpBlock2D",) * 2, attention_head_dim=8, norm_num_groups=32, dropout=0.0,
                 resnet_time_scale_shift="default"):
        super().__init__()
        channels = 3 * fold * fold
        self.unet = UNet2DModel(
            sample_size=image_size // fold, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, dropout=dropout,
            resnet_time_scale_shift=resnet_time_scale_shift, class_embed_type="identity")
        embed_dim = block_out_channels[0] * 4  # UNet2DModel's time-embedding width
        self.label_embedding = torch.nn.Sequential(
            torch.nn.Linear(len(label_names), embed_dim), torch.nn.SiLU(), torch.nn.Linear(embed_dim, embed_dim))

    @property
    def vocabulary(self):
        return Vocabulary({name: i for i, name in enumerate(self.config.label_names)}, source="the model")

    def forward(self, sample, timestep, labels):
        fold = self.config.fold
        x = F.pixel_unshuffle(sample, fold) if fold > 1 else sample
        out = self.unet(x, timestep, class_labels=self.label_embedding(labels.to(x.dtype)), return_dict=False)[0]
        return F.pixel_shuffle(out, fold) if fold > 1 else out


def build_model(preset, label_names, **overrides):
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    unknown = set(overrides) - set(inspect.signature(ConditionalUNet.__init__).parameters)
    if unknown:
        raise UserError(f"unknown model option(s) {', '.join(sorted(unknown))}")
    try:
        return ConditionalUNet(label_names=list(label_names), preset=preset, **{**PRESETS[preset], **overrides})
    except (ValueError, TypeError) as error:
        raise UserError(f"invalid model options {overrides}: {str(error).splitlines()[0][:160]}")


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Noise schedules and samplers


def training_scheduler(beta_schedule="linear", num_train_timesteps=1000, prediction_type="epsilon"):
    names = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=names[beta_schedule],
                         prediction_type=prediction_type, clip_sample=True)


SAMPLERS = ("ddpm", "ddim", "dpm++")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 25}


def sampling_scheduler(train_config, sampler):
    """A scheduler for `sampler` built from the training scheduler's config, so betas always match.

    DPM-Solver++ gets dynamic thresholding at 1.0: without it, it diverged on a cosine-schedule model
    (pixel values ~1e4), while DDPM/DDIM clip their x0 estimate by default.
    """
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_config, timestep_spacing="trailing")
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++",
                                                       thresholding=True, sample_max_value=1.0)
    raise UserError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")


class ICLEVRPipeline(DiffusionPipeline):
    """Label lists in, images out:

        pipe = ICLEVRPipeline.from_pretrained(run_dir / "model")
        pipe([["red sphere", "cyan cube"]], num_inference_steps=25, guidance_scale=2.0, generator=g).images

    Guidance follows Ho & Salimans / diffusers: eps = eps_uncond + scale * (eps_cond - eps_uncond), so
    scale 1 is plain conditional sampling and 0 is unconditional.
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def label_vectors(self, conditions):
        if isinstance(conditions, torch.Tensor):
            return conditions.float()
        vocabulary = self.unet.vocabulary
        return vocabulary.encode_all([vocabulary.check(list(c), f"condition {i}") for i, c in enumerate(conditions)])

    def predict(self, x, t, labels, guidance_scale):
        if guidance_scale == 1.0:
            return self.unet(x, t.expand(len(x)), labels)
        # conditional and unconditional halves in one forward pass
        both = self.unet(torch.cat([x, x]), t.expand(2 * len(x)), torch.cat([labels, torch.zeros_like(labels)]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def __call__(self, conditions, num_inference_steps=None, guidance_scale=1.0, generator=None,
                 output_type="pil", batch_size=64, callback=None):
        """output_type: "pil", "np" (uint8 HxWx3) or "pt" (float Bx3xHxW in [-1, 1]).
        callback(step_index, timestep, sample) sees every intermediate sample (for the process figure)."""
        labels = self.label_vectors(conditions).to(self.device)
        size = self.unet.config.image_size
        noise = randn_tensor((len(labels), 3, size, size), generator=generator, device=self.device,
                             dtype=self.unet.dtype)
        steps = num_inference_steps or self.scheduler.config.num_train_timesteps
        images = []
        for start in range(0, len(labels), batch_size):
            x, chunk = noise[start:start + batch_size], labels[start:start + batch_size].to(self.unet.dtype)
            self.scheduler.set_timesteps(steps, device=self.device)
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                output = self.predict(x, t, chunk, guidance_scale)
                x = self.scheduler.step(output, t, x, generator=generator).prev_sample
                if callback is not None:
                    callback(i, t, x)
            images.append(x.clamp(-1, 1).float())
        images = torch.cat(images)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        array = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=array if output_type == "np" else [Image.fromarray(a) for a in array])


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
    """-> ICLEVRPipeline, with one-line errors for what is missing or foreign."""
    path = find_model_dir(path)
    try:
        pipe = ICLEVRPipeline.from_pretrained(path)
    except (OSError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot load the model ({str(error).splitlines()[0][:160]})")
    if not isinstance(pipe, ICLEVRPipeline):
        raise UserError(f"{path}: a {type(pipe).__name__} folder, not an {ICLEVRPipeline.__name__}")
    pipe = pipe.to(device)
    pipe.unet.eval()
    pipe.set_progress_bar_config(leave=False)
    return pipe
