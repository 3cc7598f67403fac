"""Bad input fails before any model work, with a message that names the parameter and what is allowed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from magi_server.params import ParamError
from magi_server.runtime.pipeline import MagiPipeline


class _NoWork(torch.nn.Module):
    """Stands in for a model: any forward means validation let bad input through."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.compute_dtype = getattr(inner, "compute_dtype", torch.float32)
        self.y_embedder = getattr(inner, "y_embedder", None)

    def forward(self, *args, **kwargs):
        raise AssertionError("model ran on invalid input")

    def encoder(self, *args, **kwargs):
        raise AssertionError("VAE ran on invalid input")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MagiPipeline:
    pipe = MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))
    pipe.runner.dit = _NoWork(pipe.runner.dit)
    return pipe


@pytest.mark.parametrize(
    "kwargs, param, allowed",
    [
        (dict(num_frames=0), "num_frames", "[1, "),
        (dict(num_frames=10**6), "num_frames", "[1, "),
        (dict(num_frames=2), "num_frames", "at least 4"),
        (dict(num_frames="many"), "num_frames", "integer"),
        (dict(height=100), "height", "multiple of 16"),
        (dict(width=72), "width", "multiple of 16"),
        (dict(width=0), "width", "[16, "),
        (dict(num_inference_steps=7), "num_inference_steps", "multiple of 4"),
        (dict(num_inference_steps=6, window_size=4), "num_inference_steps", "multiple of 4"),
        (dict(num_inference_steps=0), "num_inference_steps", "[1, "),
        (dict(seed=-5), "seed", "-1 for random"),
        (dict(seed=1.5), "seed", "integer"),
        (dict(output_type="gif"), "output_type", "mp4, np, latent"),
        (dict(image=b"not an image at all"), "image", ""),
        (dict(image="/nonexistent/cat.png"), "image", ""),
        (dict(image=np.zeros((4, 4), dtype=np.uint8)), "image", "(H, W, 3) uint8"),
        (dict(video="/nonexistent/clip.mp4"), "video", ""),
        (dict(image=np.zeros((8, 8, 3), np.uint8), video_latents=torch.zeros(1, 16, 2, 8, 8)), "video_latents", "only one"),
        (dict(video_latents=torch.zeros(1, 16, 2, 4, 4)), "video_latents", "(1, 16, frames, 8, 8)"),
    ],
)
def test_bad_input_names_the_parameter(pipe, kwargs, param, allowed):
    call = dict(prompt="a cat", height=64, width=64, num_frames=24, output_type="latent")
    call.update(kwargs)
    with pytest.raises(ParamError) as info:
        pipe(**call)
    message = str(info.value)
    assert message.startswith(f"{param}:"), message
    assert allowed in message, message


def test_missing_prompt_and_too_many_prompts(pipe):
    with pytest.raises(ParamError, match=r"^prompt: required"):
        pipe(height=64, width=64, num_frames=24, output_type="latent")
    with pytest.raises(ParamError, match=r"^prompt: must be a string"):
        pipe([], height=64, width=64, num_frames=24, output_type="latent")


def test_unreadable_image_file(pipe, tmp_path):
    bad = tmp_path / "cat.png"
    bad.write_text("this is text, not a PNG")
    with pytest.raises(ParamError, match=r"^image:"):
        pipe("a cat", image=bad, height=64, width=64, num_frames=24, output_type="latent")


def test_latents_of_the_wrong_shape(pipe):
    pipe_ok = pipe
    with pytest.raises(ParamError, match=r"^latents: must have shape \(1, 16, 6, 8, 8\)"):
        pipe_ok("a cat", height=64, width=64, num_frames=24, output_type="latent", latents=torch.zeros(1, 16, 5, 8, 8))
