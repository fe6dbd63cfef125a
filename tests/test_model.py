import numpy as np
import pytest
import torch

import model as model_lib
from cli import UserError
from sampling import SamplingSettings


@pytest.fixture(scope="module")
def tiny(vocabulary):
    torch.manual_seed(0)
    return model_lib.build_model("tiny", vocabulary.names).eval()


def test_output_depends_on_the_labels(tiny, vocabulary):
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([500, 500])
    red = vocabulary.encode_all([["red sphere"], ["red sphere"]])
    other = vocabulary.encode_all([["cyan cube", "gray cylinder"], ["red sphere"]])
    with torch.no_grad():
        a, b = tiny(x, t, red), tiny(x, t, other)
    assert (a[0] - b[0]).abs().mean() > 1e-3  # different labels, different prediction
    assert torch.allclose(a[1], b[1])          # same labels, same prediction


def test_space_to_depth_keeps_full_resolution(tiny):
    assert tiny.config.fold == 2 and tiny.unet.config.sample_size == 32 and tiny.unet.config.in_channels == 12
    out = tiny(torch.randn(1, 3, 64, 64), torch.tensor([3]), torch.zeros(1, 24))
    assert out.shape == (1, 3, 64, 64)


def test_preset_sizes(vocabulary):
    counts = {name: model_lib.count_parameters(model_lib.build_model(name, vocabulary.names))
              for name in ("tiny", "small", "cpu", "seed")}
    assert 110e6 < counts["seed"] < 118e6
    assert 2e6 < counts["small"] < 4e6 and 2e6 < counts["cpu"] < 4e6
    assert counts["tiny"] < 0.5e6


def test_unknown_preset(vocabulary):
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        model_lib.build_model("huge", vocabulary.names)


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    pipe = model_lib.ICLEVRPipeline(unet=tiny, scheduler=model_lib.training_scheduler("cosine"))
    pipe.save_pretrained(tmp_path / "model")
    loaded = model_lib.load_pipeline(tmp_path / "model")
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert loaded.unet.config.label_names == tiny.config.label_names
    x, t, y = torch.randn(2, 3, 64, 64), torch.tensor([10, 900]), torch.eye(24)[:2]
    with torch.no_grad():
        assert torch.equal(tiny(x, t, y), loaded.unet(x, t, y))


def test_tiny_model_overfits_eight_images(trained_tiny):
    name, net, scheduler, x0, labels, (before, after) = trained_tiny
    # measured after/before over seeds 0-4 (150 steps): tiny/linear 0.152-0.163, tiny/cosine 0.179-0.186,
    # tiny-tokens/linear 0.029-0.034, tiny-tokens/cosine 0.034-0.044 (v-prediction, seeds 0-2: 0.084-0.095);
    # a model that does not learn stays near 1
    assert after < before / 4, f"{name}: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("sampler, steps", [("ddpm", 100), ("ddim", 20), ("dpm++", 15), ("unipc", 10)])
def test_every_sampler_and_schedule_stays_finite_and_near_the_data(trained_tiny, sampler, steps):
    """The pitfall: DPM-Solver++ diverged (pixel values ~1e4) on a cosine model; every pair must stay finite,
    inside [-1, 1] before the final clamp, and keep the data's brightness and contrast roughly."""
    name, net, scheduler, x0, labels, _ = trained_tiny
    pipe = model_lib.ICLEVRPipeline(unet=net, scheduler=model_lib.sampling_scheduler(scheduler.config, sampler))
    pipe.set_progress_bar_config(disable=True)
    final, to_image = {}, pipe.to_image
    pipe.to_image = lambda sample: to_image(final.setdefault("x", sample))  # the last sample, before the clamp
    images = pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images
    raw = final["x"]
    assert torch.isfinite(raw).all() and raw.abs().max() < 1.05, f"{sampler}/{name} diverged"
    assert images.shape[-1] == 64 and raw.shape[-1] == net.denoising_size
    pipe.to_image = to_image
    others = pipe(labels.roll(1, dims=0), num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images  # the same noise, each image asked for its neighbour's objects
    # mean |difference| measured (seed 0): tiny/linear 0.002-0.005, tiny-tokens v-prediction 0.013-0.016 over the
    # four samplers; small, as 8 overfitted images follow their noise, but exactly 0 where labels are dropped
    assert (others - images).abs().mean() > 5e-4, f"{sampler}/{name}: the labels change nothing"
    if name.startswith("tiny-tokens") and sampler != "ddim":
        # The stochastic samplers on this 8-image, 32x32 model drift in brightness: measured |mean - data mean|
        # over seeds 0-4 after 150 training steps: ddpm 0.09-0.39, dpm++ 0.06-0.26 (DDIM 0.00-0.04; after 300 or
        # 400 steps no better: ddpm up to 0.46). On a tokens model trained 100 steps on the course images the
        # same samplers keep the data's mean (-0.032 and -0.056 vs -0.037): an artefact of overfitting 8 images,
        # so only the exact property above (finite, in range) is asserted for them.
        return
    assert abs(images.mean() - x0.mean()) < 0.15, f"{sampler}/{name}: mean {images.mean():.2f} vs {x0.mean():.2f}"
    if sampler not in ("dpm++", "unipc"):
        # The multistep solvers keep the noise an under-trained model fails to predict (measured on this tiny
        # model: DPM-Solver++ contrast 3.2x the data's after 150 steps, 2.1x after 1200, DDIM 0.6x; UniPC at 10
        # steps 3.18-3.21x over seeds 0-4, both schedules); docs/RESULTS.md compares samplers by evaluator
        # accuracy on real models instead. Measured over seeds 0-4: ddpm 2.0-2.05x.
        assert images.std() < 3 * x0.std(), f"{sampler}/{name}: contrast of noise, not of scenes"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", model_lib.SAMPLERS)
def test_every_sampler_starts_from_pure_noise_with_the_documented_settings(sampler, schedule):
    """Trailing spacing: the first step is the last training timestep (diffusers' default "leading" starts 20
    steps at t = 950); DPM-Solver++ on the cosine schedule clips lambda at -5.1 as diffusers documents, which
    moves its first step below the timesteps whose lambda is under that."""
    train = model_lib.training_scheduler(schedule, prediction_type="v_prediction")
    scheduler = model_lib.sampling_scheduler(train.config, sampler)
    scheduler.set_timesteps(20)
    assert scheduler.config.timestep_spacing == "trailing" and len(scheduler.timesteps) == 20
    if sampler == "dpm++" and schedule == "cosine":
        assert scheduler.config.lambda_min_clipped == -5.1
        alphas = train.alphas_cumprod
        lambdas = 0.5 * torch.log(alphas / (1 - alphas))
        assert lambdas[scheduler.timesteps[0]] >= -5.1 > lambdas[-1]
    else:
        assert scheduler.timesteps[0] == 999
    assert (scheduler.timesteps[:-1] > scheduler.timesteps[1:]).all()


def test_guidance(trained_tiny):
    _, net, scheduler, _, labels, _ = trained_tiny
    pipe = model_lib.ICLEVRPipeline(unet=net, scheduler=model_lib.sampling_scheduler(scheduler.config, "ddim"))
    pipe.set_progress_bar_config(disable=True)

    def sample(conditions, scale, max_t=None):
        return pipe(conditions, SamplingSettings("ddim", 5, scale, max_t), generator=torch.Generator().manual_seed(3),
                    output_type="np").images

    assert np.array_equal(sample(labels[:2], 0.0), sample(labels[2:4], 0.0))  # scale 0: labels ignored
    assert not np.array_equal(sample(labels[:2], 1.0), sample(labels[:2], 3.0))
    # guidance limited to t < max_t: 0 guides no step, 1000 every step (DDIM 5 steps: t = 999, 799, ..., 199),
    # 500 the last three only, which is neither
    unguided, guided, partly = sample(labels[:2], 1.0), sample(labels[:2], 3.0), sample(labels[:2], 3.0, 500)
    assert np.array_equal(sample(labels[:2], 3.0, 0), unguided)
    assert np.array_equal(sample(labels[:2], 3.0, 1000), guided)
    assert not np.array_equal(partly, unguided) and not np.array_equal(partly, guided)


def test_pipeline_accepts_label_names_and_checks_them(tiny):
    pipe = model_lib.ICLEVRPipeline(unet=tiny, scheduler=model_lib.sampling_scheduler(
        model_lib.training_scheduler().config, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe([["red sphere", "cyan cube"]], num_inference_steps=2, output_type="pil")
    assert out.images[0].size == (64, 64)
    with pytest.raises(UserError, match="condition 0: unknown label 'red spere'"):
        pipe([["red spere"]], num_inference_steps=2)


def test_missing_and_foreign_model_folders(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        model_lib.load_pipeline(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        model_lib.load_pipeline(tmp_path / "empty")


def test_model_options_override_the_preset(vocabulary):
    net = model_lib.build_model("tiny", vocabulary.names, block_out_channels=[16, 24],
                                resnet_time_scale_shift="scale_shift")
    assert list(net.config.block_out_channels) == [16, 24] and net.unet.config.resnet_time_scale_shift == "scale_shift"
    with pytest.raises(UserError, match="unknown model option"):
        model_lib.build_model("tiny", vocabulary.names, colour="blue")
    with pytest.raises(UserError, match="invalid model options"):
        model_lib.build_model("tiny", vocabulary.names, norm_num_groups=7)


# ---------------------------------------------------------------------------------------------------------
# The object-token model (the CPU recipe): denoises at 32x32, outputs 64x64


@pytest.fixture(scope="module")
def tiny_tokens(vocabulary):
    torch.manual_seed(0)
    return model_lib.build_model("tiny-tokens", vocabulary.names).eval()


def test_object_tokens_bind_colour_to_shape(tiny_tokens, vocabulary):
    """Each requested object is one token, colour embedding + shape embedding, padded with the null token;
    swapping colours between two shapes changes the tokens, and the all-zero vector is all null tokens."""
    swapped = vocabulary.encode_all([["red sphere", "cyan cube"], ["red cube", "cyan sphere"], ["red sphere"]])
    tokens = tiny_tokens.object_tokens(torch.cat([swapped, torch.zeros(1, 24)]))
    assert tokens.shape == (4, 4, 32)
    colour = dict(zip(["red", "cyan"], tiny_tokens.colour_embedding.weight[[6, 2]]))  # sorted colour names
    shape = dict(zip(["cube", "sphere"], tiny_tokens.shape_embedding.weight[[0, 2]]))
    expected = {tuple((colour[c] + shape[s]).tolist()) for c, s in [("red", "sphere"), ("cyan", "cube")]}
    assert {tuple(t.tolist()) for t in tokens[0, :2]} == expected
    null = tiny_tokens.null_token
    assert all(torch.equal(t, null) for t in tokens[0, 2:]) and all(torch.equal(t, null) for t in tokens[3])
    assert all(torch.equal(t, null) for t in tokens[2, 1:])
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([700, 700])
    with torch.no_grad():
        out = tiny_tokens(x, t, swapped[:2])
        again = tiny_tokens(x.flip(0), t, swapped[:2].flip(0)).flip(0)
    assert (out[0] - tiny_tokens(x[:1], t[:1], swapped[1:2])).abs().mean() > 1e-3  # binding changes the output
    assert torch.allclose(out, again, atol=1e-6)  # batch position does not matter


def test_more_token_slots_with_null_tokens_keep_what_the_model_reads(tiny_tokens, vocabulary):
    """Raising max_objects from 4 to 6 adds null tokens to every request and changes its output; with
    null_tokens=4 the extra slots are masked out for requests of up to 4 labels (the same output, to float
    rounding), and requests of 5 and 6 labels read all their objects."""
    requests = vocabulary.encode_all([[], ["red sphere"], ["red sphere", "cyan cube", "gray cylinder", "blue cube"],
                                      ["red sphere", "cyan cube", "gray cylinder", "blue cube", "green sphere"]])
    six = model_lib.build_model("tiny-tokens", vocabulary.names, max_objects=6).eval()
    masked = model_lib.build_model("tiny-tokens", vocabulary.names, max_objects=6, null_tokens=4).eval()
    for model in (six, masked):
        model.load_state_dict(tiny_tokens.state_dict())
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([900, 600, 300, 50])
    with torch.no_grad():
        four, plain, kept = tiny_tokens(x[:3], t[:3], requests[:3]), six(x, t, requests), masked(x, t, requests)
    # two more null tokens change every request with an object (all-null attention reads the null token alike)
    assert (plain[1:3] - four[1:]).abs().amax((1, 2, 3)).min() > 1e-4
    assert torch.allclose(kept[:3], four, atol=1e-5)
    assert masked.token_mask(requests).tolist() == [[1, 1, 1, 1, 0, 0]] * 3 + [[1, 1, 1, 1, 1, 0]]
    fifth = vocabulary.encode_all([["red sphere", "cyan cube", "gray cylinder", "blue cube", "brown cube"]])
    with torch.no_grad():
        assert (masked(x[3:], t[3:], fifth) - kept[3:]).abs().mean() > 1e-4  # the fifth object is read


def test_token_model_denoises_at_32_and_outputs_64(tiny_tokens):
    assert tiny_tokens.denoising_size == 32 and tiny_tokens.config.image_size == 64
    pipe = model_lib.ICLEVRPipeline(unet=tiny_tokens, scheduler=model_lib.sampling_scheduler(
        model_lib.training_scheduler().config, "ddim"))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    images = pipe([["red sphere", "cyan cube"]], num_inference_steps=2, output_type="pt",
                  callback=lambda i, t, x, x0: seen.append(x.shape)).images
    assert seen == [(1, 3, 32, 32)] * 2 and images.shape == (1, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(UserError, match="condition 0: 5 labels, but this model draws at most 4 objects"):
        pipe([["red sphere", "cyan cube", "gray cube", "blue cube", "green cube"]], num_inference_steps=2)


def test_token_model_save_load_round_trip(tiny_tokens, tmp_path):
    pipe = model_lib.ICLEVRPipeline(unet=tiny_tokens, scheduler=model_lib.training_scheduler())
    pipe.save_pretrained(tmp_path / "model")
    loaded = model_lib.load_pipeline(tmp_path / "model")
    assert type(loaded.unet) is model_lib.ObjectTokenUNet and loaded.unet.denoising_size == 32
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.eye(24)[:2]
    with torch.no_grad():
        assert torch.equal(tiny_tokens(x, t, y), loaded.unet(x, t, y))


def test_downsampling_then_upsampling_keeps_the_image():
    """i-CLEVR-like content (smooth, ~32 px of detail) survives 64 -> 32 -> 64 almost unchanged, and the
    2x2 average is exact: what the 32x32 models learn is the 64-px image binned."""
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    smooth = torch.nn.functional.interpolate(x, size=64, mode="bicubic", align_corners=False).clamp(-1, 1)
    small = model_lib.to_sample_size(smooth, 32)
    assert torch.allclose(small, torch.nn.functional.avg_pool2d(smooth, 2))
    back = model_lib.to_image_size(small, 64)
    assert back.shape == smooth.shape and (back - smooth).abs().mean() < 0.01
    assert model_lib.to_sample_size(smooth, 64) is smooth and model_lib.to_image_size(smooth, 64) is smooth


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_training_target_and_the_clean_estimate_are_inverse(prediction_type):
    """The one home of the diffusion maths: a perfect prediction of the training target (noise or velocity) gives
    back the clean image the noisy one was made from, at every noise level (as the process figure shows it)."""
    from model import clean_estimate, prediction_target, training_scheduler

    scheduler = training_scheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=generator) * 1.6 - 0.8
    noise = torch.randn(x0.shape, generator=generator)
    for step in (0, 250, 600, 999):
        t = torch.full((3,), step)
        noisy = scheduler.add_noise(x0, noise, t)
        target = prediction_target(scheduler, x0, noise, t)
        assert torch.allclose(clean_estimate(scheduler, target, step, noisy), x0, atol=1e-3 if step < 999 else 0.05)
    assert torch.equal(prediction_target(scheduler, x0, noise, t), noise) == (prediction_type == "epsilon")
