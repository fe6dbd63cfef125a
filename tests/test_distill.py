"""Guidance distillation (distill.py): a student that gives its teacher's guided output in one pass."""
import contextlib
import json
import shutil

import numpy as np
import pytest
import torch

import model as model_lib
from conftest import last_line, run_main
from distill import new_student
from sampling import SamplingSettings
from training import ddim_step, distillation_loss, guided_target, halving_loss, one_step_target

FIVE = ["red sphere", "cyan cube", "gray cylinder", "yellow cube", "blue sphere"]
REQUESTS = [["red sphere"], ["cyan cube", "blue cylinder"], ["gray cube", "green sphere", "purple cylinder"], FIVE]


@pytest.fixture(scope="module")
def teacher_folder(vocabulary, tmp_path_factory):
    """An (untrained) tiny object-token model folder that samples with guidance 3, as the shipped one does."""
    torch.manual_seed(0)
    unet = model_lib.build_model("tiny-tokens", vocabulary.names, trained_objects=3)
    folder = tmp_path_factory.mktemp("teacher") / "model"
    model_lib.ICLEVRPipeline(unet=unet, scheduler=model_lib.training_scheduler(
        prediction_type="v_prediction")).save_pretrained(folder)
    SamplingSettings("ddim", 4, 3.0).write(folder)
    return folder


def distill(data_dir, teacher, out, *args):
    return run_main("distill.py", "--teacher", teacher, "--data-dir", data_dir, "--out", out, "--batch-size", 4,
                    "--warmup-steps", 1, "--log-every", 1, "--checkpoint-every", 2, "--max-steps", 4, *args)


def draw(pipe, conditions, settings, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(conditions, settings, output_type="np", generator=torch.Generator().manual_seed(seed)).images


def unet_rows(pipe):
    """A counter of the rows the pipeline's UNet is given, pass by pass."""
    rows = []
    pipe.unet.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    return rows


def held_out_loss_before_and_after(loss, student, steps=60):
    """`loss(seed)` summed over 4 seeds no training step drew, before and after `steps` AdamW steps on others."""
    def held_out():
        with torch.no_grad():
            return sum(loss(1000 + i).item() for i in range(4))

    before = held_out()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)
    for step in range(steps):
        optimizer.zero_grad()
        loss(step).backward()
        optimizer.step()
    return before, held_out()


def test_a_new_student_samples_exactly_as_its_teacher_unguided_in_one_pass_a_step(teacher_folder):
    """The guidance input's projection starts at zero, so before it learns, the student at any scale is its
    teacher's conditional output: the same images as the teacher at guidance 1, jointly and composed (5 objects),
    and one UNet pass a step where the guided teacher takes two (its batch holds the unconditional rows too)."""
    teacher = model_lib.load_pipeline(teacher_folder)
    student_pipe = model_lib.ICLEVRPipeline(unet=new_student(teacher.unet, 32), scheduler=teacher.scheduler)
    for pipe in (teacher, student_pipe):
        pipe.scheduler = model_lib.sampling_scheduler(pipe.scheduler.config, "ddim")
    assert student_pipe.unet.distilled and not teacher.unet.distilled
    student_rows, teacher_rows = unet_rows(student_pipe), unet_rows(teacher)
    student_images = draw(student_pipe, REQUESTS, SamplingSettings("ddim", 4, 3.0))
    guided = draw(teacher, REQUESTS, SamplingSettings("ddim", 4, 3.0))
    assert np.array_equal(student_images, draw(teacher, REQUESTS, SamplingSettings("ddim", 4, 1.0)))
    assert not np.array_equal(student_images, guided)
    composed_rows = 3 + 10  # a row for each joint request; the 5-object one: its 10 subsets of 3 labels
    assert student_rows == [composed_rows] * 4
    assert teacher_rows[:4] == [composed_rows + len(REQUESTS)] * 4


def test_distillation_teaches_the_guided_output(vocabulary):
    """Optimisation steps on one batch halve the gap between the student's one pass and the teacher's guided two,
    and give it a response to the scale (none before: its projection starts at zero) that points the way the
    teacher's guidance does: a cosine far above a random direction's (about 0.01 in these 24,576 numbers)."""
    torch.manual_seed(0)
    teacher = model_lib.build_model("tiny-tokens", vocabulary.names).eval().requires_grad_(False)
    student = new_student(teacher, 32)
    scheduler = model_lib.training_scheduler(prediction_type="v_prediction")
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    labels = vocabulary.encode_all([REQUESTS[i % 3] for i in range(8)])

    def loss(seed):
        return distillation_loss(student, teacher, scheduler, x0, labels, torch.Generator().manual_seed(seed),
                                 (2.0, 4.0), contextlib.nullcontext)

    @torch.no_grad()
    def response_to_scale(t):
        """(the student's output at w=4 minus at w=2, the teacher's guided output's same difference)"""
        t = torch.full((8,), t)
        noisy = scheduler.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)), t)
        student_change = student(noisy, t, labels, guidance_scale=4.0) - student(noisy, t, labels, guidance_scale=2.0)
        teacher_change = (guided_target(teacher, noisy, t, labels, torch.full((8,), 4.0), contextlib.nullcontext)
                          - guided_target(teacher, noisy, t, labels, torch.full((8,), 2.0), contextlib.nullcontext))
        return student_change.flatten(), teacher_change.flatten()

    assert all(not response_to_scale(t)[0].any() for t in (100, 500, 900))
    before, after = held_out_loss_before_and_after(loss, student)
    assert after < 0.5 * before, (before, after)
    for t in (100, 500, 900):
        assert torch.nn.functional.cosine_similarity(*response_to_scale(t), dim=0) > 0.05, t


def test_distill_script_checkpoints_resumes_exactly_and_exports_a_student(synthetic_data, teacher_folder, tmp_path):
    """distill.py writes train.py's run folder and caches decoded images in --cache-dir; an interrupted run resumed
    gives the uninterrupted one's losses; the exported student loads, draws finite images that follow their labels,
    the same ones for the same seed after a save/load round trip, with the teacher's sampling settings."""
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "whole", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert list((tmp_path / "cache").glob("images-*.npy")), "--cache-dir: the decoded images are cached there"
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "split", "--max-minutes", "0")
    assert code == 0 and "stopped after --max-minutes at step 1" in err, err
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "split", "--resume", "latest")
    assert code == 0 and "resumed from" in err, err

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-7), step

    folder = tmp_path / "whole" / "model"
    pipe, settings = model_lib.prepare_pipeline(folder)
    assert pipe.unet.distilled and settings.guidance_scale == 3.0 and settings.steps == 4
    images = model_lib.generate(pipe, [["red sphere"], ["cyan cube", "blue cylinder"]] * 2, settings, seed=3)
    assert np.isfinite(images.astype(float)).all()
    alone = model_lib.generate(pipe, [["red sphere"], ["red sphere"]], settings, seed=3)
    assert np.abs(alone[1].astype(float) - images[1].astype(float)).mean() > 1.0  # its labels change the image
    pipe.save_pretrained(tmp_path / "again")
    again, _ = model_lib.prepare_pipeline(tmp_path / "again", sampler="ddim", steps=4, guidance_scale=3.0)
    assert np.array_equal(model_lib.generate(again, [["red sphere"], ["cyan cube", "blue cylinder"]] * 2, settings,
                                             seed=3), images)


def test_a_student_learning_only_its_conditioning_keeps_the_teachers_other_weights(synthetic_data, teacher_folder,
                                                                                    tmp_path):
    """--learn conditioning: the time embedding, its projections, cross-attention, the embeddings and the norms
    change; every other weight (convolutions, self-attention, feed-forward) stays the teacher's to the bit."""
    from distill import CONDITIONING

    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "run", "--learn", "conditioning", "--lr", "1e-2",
                           "--ema-decay", "0.5")
    assert code == 0, err
    teacher = model_lib.load_pipeline(teacher_folder).unet.state_dict()
    student = model_lib.load_pipeline(tmp_path / "run" / "model").unet.state_dict()
    changed = {name for name, weight in teacher.items() if not torch.equal(weight.half(), student[name].half())}
    kept = set(teacher) - changed
    assert changed and all(CONDITIONING.search(name) for name in changed)
    assert any("conv1" in name for name in kept) and any("attn1.to_q" in name for name in kept)
    assert any("attn2.to_k" in name for name in changed) and any("time_emb_proj" in name for name in changed)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert 0 < config["learning_parameters"] < config["parameters"] / 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_distillation_step_is_diffusers_ddim_step_and_its_target_inverts_it(prediction_type):
    """halving_loss's DDIM step is the one the pipeline's DDIMScheduler takes (clipped clean estimate, eta 0), and
    the one-step target is the output whose step lands on a given image."""
    training = model_lib.training_scheduler(prediction_type=prediction_type)
    ddim = model_lib.sampling_scheduler(training.config, "ddim")
    ddim.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x, output = (torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2))
    for t in ddim.timesteps:
        t_next = int(t) - 100  # -1 at the last step: the clean image
        ours = ddim_step(training, x, output, torch.full((4,), int(t)), torch.full((4,), t_next))
        assert torch.allclose(ours, ddim.step(output, t, x).prev_sample, atol=1e-5), int(t)
        # an image noised to t, and where DDIM takes it with the true output: the target is that output
        clean = torch.rand(4, 3, 8, 8, generator=generator) * 1.8 - 0.9
        noise = torch.randn(4, 3, 8, 8, generator=generator)
        noisy = training.add_noise(clean, noise, torch.full((4,), int(t)))
        true = model_lib.prediction_target(training, clean, noise, torch.full((4,), int(t)))
        x_next = ddim_step(training, noisy, true, torch.full((4,), int(t)), torch.full((4,), t_next))
        target = one_step_target(training, noisy, x_next, torch.full((4,), int(t)), torch.full((4,), t_next))
        assert torch.allclose(target, true, atol=1e-3), int(t)


def test_a_student_that_halves_the_steps_learns_its_teachers_two_steps(vocabulary):
    """Optimisation steps on one batch close much of the gap between the student's one DDIM step and its teacher's
    two (measured: 0.203 -> 0.106)."""
    torch.manual_seed(0)
    teacher = new_student(model_lib.build_model("tiny-tokens", vocabulary.names), 32).eval().requires_grad_(False)
    student = new_student(teacher, 32)
    assert student.distilled and all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    scheduler = model_lib.training_scheduler(prediction_type="v_prediction")
    ddim = model_lib.sampling_scheduler(scheduler.config, "ddim")
    ddim.set_timesteps(4)
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    labels = vocabulary.encode_all([REQUESTS[i % 3] for i in range(8)])

    def loss(seed):
        return halving_loss(student, teacher, scheduler, ddim.timesteps, x0, labels,
                            torch.Generator().manual_seed(seed), (2.0, 4.0), contextlib.nullcontext)

    before, after = held_out_loss_before_and_after(loss, student)
    assert after < 0.6 * before, (before, after)


def test_halve_steps_distils_a_student_of_half_the_steps(synthetic_data, teacher_folder, tmp_path):
    """A student of a student: its sampling.json asks for half its teacher's DDIM steps, and it draws with them;
    teachers it cannot halve are one-line errors."""
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "first", "--max-steps", "1")
    assert code == 0, err
    code, _, err = distill(synthetic_data, tmp_path / "first" / "model", tmp_path / "halved", "--halve-steps")
    assert code == 0, err
    pipe, settings = model_lib.prepare_pipeline(tmp_path / "halved" / "model")
    assert pipe.unet.distilled and (settings.sampler, settings.steps, settings.guidance_scale) == ("ddim", 2, 3.0)
    rows = unet_rows(pipe)
    assert np.isfinite(model_lib.generate(pipe, REQUESTS[:2], settings).astype(float)).all() and len(rows) == 2
    for bad, message in [(SamplingSettings("ddim", 3, 3.0), "samples with ddim 3: --halve-steps needs DDIM with an "
                                                             "even number of steps"),
                         (SamplingSettings("ddim", 4, 3.0, 500), "guides some steps or object counts differently")]:
        shutil.copytree(teacher_folder, tmp_path / "bad-teacher", dirs_exist_ok=True)
        bad.write(tmp_path / "bad-teacher")
        code, _, err = distill(synthetic_data, tmp_path / "bad-teacher", tmp_path / "bad", "--halve-steps")
        assert code == 2 and message in last_line(err), err


@pytest.mark.parametrize("args, message", [
    (["--guidance-min", "4", "--guidance-max", "2"], "--guidance-min must be at least 0 and at most --guidance-max"),
    (["--guidance-min", "3.5"], "the teacher samples at guidance 3.0, outside --guidance-min 3.5"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_distillation_arguments_are_one_line_errors(synthetic_data, teacher_folder, tmp_path, args, message):
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "run", *args)
    assert code != 0 and message in last_line(err), err


def test_what_cannot_be_distilled_is_a_one_line_error(synthetic_data, teacher_folder, tiny_run, tmp_path):
    code, _, err = distill(synthetic_data, tiny_run / "model", tmp_path / "a")
    assert code == 2 and "distils object-token models" in last_line(err), err
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "b", "--max-steps", "1")
    assert code == 0, err
    code, _, err = distill(synthetic_data, tmp_path / "b" / "model", tmp_path / "c")
    assert code == 2 and "is a distilled student already" in last_line(err), err
    code, _, err = distill(synthetic_data, tmp_path / "b" / "model", tmp_path / "b", "--resume", "latest")
    assert code == 2 and f"distils {teacher_folder}" in last_line(err), err


def test_a_student_ships_as_a_profile_of_its_teachers_folder(synthetic_data, teacher_folder, tiny_run, tmp_path):
    """export.py --as-profile fast --profile-unet STUDENT: the teacher's folder gains a profile that samples with
    the student, kept as its difference from the teacher (a fraction of the UNet's file for a student that learned
    its conditioning only): the student's own images and settings; the default stays the teacher; a re-export
    keeps the profile."""
    code, _, err = distill(synthetic_data, teacher_folder, tmp_path / "run", "--learn", "conditioning", "--lr", "1e-2",
                           "--ema-decay", "0.5")
    assert code == 0, err
    student = tmp_path / "run" / "model"
    code, out, err = run_main("export.py", teacher_folder, tmp_path / "shipped", "--as-profile", "fast",
                              "--profile-unet", student)
    assert code == 0, err
    shipped = tmp_path / "shipped"
    whole = (shipped / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (shipped / "fast.unet.safetensors").stat().st_size < whole / 2
    fast, fast_settings = model_lib.prepare_pipeline(shipped, profile="fast")
    code, _, err = run_main("export.py", student, tmp_path / "student-fp16")  # both sides in fp16, as shipped
    assert code == 0, err
    own, own_settings = model_lib.prepare_pipeline(tmp_path / "student-fp16")
    assert fast.unet.distilled and fast_settings == own_settings
    images = model_lib.generate(fast, REQUESTS[:2], fast_settings, seed=1)
    assert np.array_equal(images, model_lib.generate(own, REQUESTS[:2], own_settings, seed=1))
    default, _ = model_lib.prepare_pipeline(shipped)
    assert not default.unet.distilled
    code, _, err = run_main("export.py", shipped, tmp_path / "again")
    assert code == 0, err
    again, again_settings = model_lib.prepare_pipeline(tmp_path / "again", profile="fast")
    assert np.array_equal(model_lib.generate(again, REQUESTS[:2], again_settings, seed=1), images)
    code, _, err = run_main("sample.py", "--model", shipped, "--profile", "fast", "--labels", "red sphere",
                            "--out", tmp_path / "drawn")
    assert code == 0 and (tmp_path / "drawn").is_dir(), err


def test_a_profile_unet_that_is_no_student_is_a_one_line_error(teacher_folder, tiny_run, tmp_path):
    code, _, err = run_main("export.py", teacher_folder, tmp_path / "out", "--as-profile", "fast", "--profile-unet",
                            tiny_run / "model")
    assert code == 2 and last_line(err) == "error: --profile-unet: a ConditionalUNet is no student of a ObjectTokenUNet"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
    code, _, err = run_main("export.py", teacher_folder, tmp_path / "out", "--profile-unet", tiny_run / "model")
    assert code == 2 and "--profile-unet needs --as-profile NAME" in last_line(err)


def test_a_profile_unet_of_low_rank_factors_gives_the_students_weights(teacher_folder, tmp_path):
    """export.py --profile-rank R stores each changed weight as rank-R factors of its change where they are
    smaller: a student whose every matrix changed by rank 2 comes back from rank-2 factors (to fp16 rounding) in a
    fraction of the full difference's file, and not from rank 1."""
    teacher = model_lib.load_pipeline(teacher_folder)
    student = model_lib.load_pipeline(teacher_folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in student.unet.parameters():
            if weight.dim() > 1:
                up, down = torch.randn(weight.shape[0], 2, generator=generator), torch.randn(2, weight[0].numel(),
                                                                                        generator=generator)
                weight += 0.01 * (up @ down).reshape(weight.shape)
            else:
                weight += 0.01 * torch.randn(weight.shape, generator=generator)
    student.save_pretrained(tmp_path / "student")
    SamplingSettings("ddim", 2, 1.0).write(tmp_path / "student")
    for rank in (None, 2, 1):
        args = [] if rank is None else ["--profile-rank", rank]
        code, _, err = run_main("export.py", teacher_folder, tmp_path / f"rank-{rank}", "--fp32", "--as-profile",
                                "fast", "--profile-unet", tmp_path / "student", *args)
        assert code == 0, err
    sizes = {rank: (tmp_path / f"rank-{rank}" / "fast.unet.safetensors").stat().st_size for rank in (None, 2, 1)}
    assert sizes[1] < sizes[2] < sizes[None] / 2
    wanted = student.unet.state_dict()
    for rank, close in ((None, True), (2, True), (1, False)):
        fast, settings = model_lib.prepare_pipeline(tmp_path / f"rank-{rank}", profile="fast")
        got = fast.unet.state_dict()
        assert all(torch.allclose(got[name], wanted[name], atol=2e-3) for name in wanted) is close
        assert settings.steps == 2 and not any(torch.equal(got[name], teacher.unet.state_dict()[name])
                                               for name in wanted)
        assert np.isfinite(draw(fast, REQUESTS[:2], settings)).all()


@pytest.mark.parametrize("args, message", [
    (["--profile-rank", "2"], "--profile-rank needs --profile-unet STUDENT: the UNet whose change it stores"),
    (["--as-profile", "fast", "--profile-unet", "STUDENT", "--profile-rank", "0"], "--profile-rank must be at least 1"),
])
def test_bad_profile_ranks_are_one_line_errors(teacher_folder, tmp_path, args, message):
    code, _, err = run_main("export.py", teacher_folder, tmp_path / "out", *args)
    assert code == 2 and last_line(err).endswith(f"error: {message}") and not (tmp_path / "out").exists()


def test_a_low_rank_factor_without_its_pair_is_a_one_line_error(teacher_folder, tmp_path):
    teacher = model_lib.load_pipeline(teacher_folder)
    name = next(name for name, weight in teacher.unet.state_dict().items() if weight.dim() > 1)
    model_lib.save_unet_difference(({name + model_lib.LOW_RANK_UP: torch.zeros(3, 1)}, {}), tmp_path / "x.safetensors")
    with pytest.raises(model_lib.UserError) as error:
        model_lib.with_unet_difference(teacher.unet, tmp_path / "x.safetensors")
    assert str(error.value) == f"{tmp_path / 'x.safetensors'}: does not fit the folder's UNet ({name})"
