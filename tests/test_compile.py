"""torch.compile of the DiT's token-wise layer parts: compiled graphs are reused across requests of any length.

The golden parity of the compiled path is in test_dit_golden.py (the "compiled" execution mode).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from magi_server.models.dit import token_pieces
from magi_server.runtime.pipeline import MagiPipeline

pytestmark = pytest.mark.slow


def _compiles() -> int:
    # one frame compile per graph Dynamo builds; a recompile (guard failure) adds one
    return int(counters["stats"]["unique_graphs"])


def test_longer_request_recompiles_nothing(tmp_path_factory):
    pipe = MagiPipeline.from_pretrained("tiny", cache_dir=tmp_path_factory.mktemp("cache"))
    pipe.dit.set_compiled(True)
    torch._dynamo.reset()
    counters.clear()

    steps = []
    first = pipe(prompt="a", num_frames=96, height=64, width=64, seed=1, output_type="latent",
                 callback_on_step=lambda done, total: steps.append(_compiles()))
    # every graph is built by the first call of its kind; later calls of the 96-frame request built nothing
    assert steps[0] >= 1
    assert steps[-1] == steps[0], f"graphs built after the first call: {steps}"
    before = _compiles()

    second = pipe(prompt="a", num_frames=240, height=64, width=64, seed=1, output_type="latent")
    assert _compiles() == before, "the 240-frame request recompiled"
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0
    assert first.latents.shape[2] < second.latents.shape[2]

    # the compiled request equals the eager one within float32 reordering
    pipe.dit.set_compiled(False)
    eager = pipe(prompt="a", num_frames=96, height=64, width=64, seed=1, output_type="latent")
    scale = max(1.0, eager.latents.abs().max().item())
    assert (eager.latents - first.latents).abs().max().item() <= 3e-4 * scale


def test_token_pieces_cover_every_row_once_within_one_chunk():
    pieces = token_pieces(elements=2, chunks=3, tokens_per_chunk=21600, max_tokens=8192)
    rows = [r for p in pieces for r in range(p.start, p.end)]
    assert rows == list(range(2 * 3 * 21600))
    for p in pieces:
        assert p.end - p.start <= 8192
        assert p.start // 21600 == (p.end - 1) // 21600 == p.element * 3 + p.chunk
        assert p.position == p.start - p.element * 3 * 21600
    # the same resolution always gives the same piece sizes (compiled code is reused across calls)
    assert {p.end - p.start for p in pieces} == {7200}
