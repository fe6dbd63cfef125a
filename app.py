"""A local page to compose scenes: pick 1-6 objects, a seed and the guidance, and watch them form.

    python app.py --model pretrained/iclevr-tokens          # then open http://127.0.0.1:7860

The page draws with the model folder's sampling settings (or a named profile of it), shows a progress bar while
it draws, the images, the denoising process as a strip (the model's estimate of the clean image at a few steps)
and the seconds taken. A request the model refuses (7 objects) shows the same one-line message as sample.py, and
the server keeps running. It listens on 127.0.0.1 only, unless --host or --share asks for more.
"""
import argparse
import importlib.util
import os
import time

import numpy as np
import torch

from cli import UserError, run_cli
from model import generate, prepare_pipeline, runnable_here, sampling_scheduler
from sampling import SamplingSettings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
STRIP_FRAMES = 6  # columns of the process strip


def process_strip(pipe, seen, frames=STRIP_FRAMES):
    """The first image's clean estimates at `frames` steps spread over the chain, side by side (uint8 HxWx3)."""
    chosen = np.linspace(0, len(seen) - 1, min(frames, len(seen))).round().astype(int)
    columns = [pipe.to_image(seen[i])[0] for i in chosen]
    strip = torch.cat(columns, dim=-1).permute(1, 2, 0).float()
    return ((strip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def draw(pipe, settings, labels, seed, guidance_scale, images, progress):
    """-> (images, process strip, message): the message is the seconds taken, or the one-line error."""
    if not labels:
        return None, None, "error: pick at least one object"
    settings = settings.replace(guidance_scale=float(guidance_scale))
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, settings.sampler)  # the profile's sampler
    seen = []

    def step(i, t, x, clean):
        progress((i + 1) / settings.steps, desc=f"step {i + 1} of {settings.steps}")
        seen.append(clean[:1].detach())

    start = time.perf_counter()
    try:
        drawn = generate(pipe, [list(labels)] * int(images), settings, int(seed), callback=step)
    except UserError as error:
        return None, None, f"error: {error}"
    seconds = time.perf_counter() - start
    return list(drawn), process_strip(pipe, seen), (f"{len(drawn)} image(s) of {', '.join(labels)} in "
                                                    f"{seconds:.1f} s ({settings.describe()})")


def build_page(pipe, settings_by_profile):
    import gradio as gr

    names = pipe.unet.vocabulary.names
    with gr.Blocks(title="i-CLEVR diffusion: compose a scene") as page:
        gr.Markdown("## Compose an i-CLEVR scene\nPick 1-6 objects (colour x shape), a seed and the guidance.")
        with gr.Row():
            with gr.Column(scale=2):
                labels = gr.CheckboxGroup(names, label="objects", elem_id="objects")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    images = gr.Slider(1, 8, value=4, step=1, label="images", elem_id="images")
                default = next(iter(settings_by_profile.values()))
                guidance = gr.Slider(0, 10, value=default.guidance_scale, step=0.5, label="guidance",
                                     elem_id="guidance")
                profile = gr.Dropdown(list(settings_by_profile), value=next(iter(settings_by_profile)),
                                      label="sampling profile", visible=len(settings_by_profile) > 1)
                button = gr.Button("Draw", variant="primary", elem_id="draw")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="images", columns=4, height=300, elem_id="gallery")
                strip = gr.Image(label="the denoising process (clean estimate)", elem_id="strip")
                message = gr.Markdown(elem_id="message")

        def on_draw(chosen, seed_value, guidance_value, images_value, profile_name, progress=gr.Progress()):
            return draw(pipe, settings_by_profile[profile_name], chosen, seed_value, guidance_value, images_value,
                        progress)

        button.click(on_draw, [labels, seed, guidance, images, profile], [gallery, strip, message])
    return page


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained/iclevr-tokens", help="model folder to draw with")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public link (off by default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port must be between 1 and 65535 (got {args.port})")
    return args


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("gradio") is None:  # before the model loads
        raise UserError("app.py needs gradio (pip install -r requirements.txt)")
    pipe, settings = prepare_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    profiles = {"default": settings, **{name: runnable_here(SamplingSettings.resolve(pipe.sampling_settings,
                                                                                      profile=name), pipe.device.type)
                                        for name in pipe.sampling_settings.get("profiles", {})}}
    page = build_page(pipe, profiles)
    print(f"serving {args.model} on http://{args.host}:{args.port}", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False)
    return 0


if __name__ == "__main__":
    run_cli(main)
