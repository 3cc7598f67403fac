"""magi-server: MAGI-1 served through the hosted providers' APIs, and usable as a library.

``from magi_server import MagiPipeline`` is the diffusers-style entry point; it is resolved lazily so that
``import magi_server`` (the CLI, the HTTP layer) does not pay for importing torch.
"""
from __future__ import annotations

__all__ = ["MagiPipeline"]


def __getattr__(name: str):
    if name == "MagiPipeline":
        from magi_server.runtime.pipeline import MagiPipeline

        return MagiPipeline
    raise AttributeError(f"module 'magi_server' has no attribute {name!r}")
