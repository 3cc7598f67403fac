"""GenerationParams: the one record of "what to generate" that crosses every layer (HTTP -> engine -> runner).

Plain, frozen and torch-free, so the API adapters build it, the job store persists it as JSON, the scheduler reads
its shape, and the runner executes it. Every knob that changes the output travels here, never in a global.
Inputs that came over the network (image, prefix video) are already fetched, validated and stored as files by the
HTTP layer before a job exists; here they are paths.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

TASKS = ("t2v", "i2v", "v2v")


@dataclass(frozen=True)
class GenerationParams:
    prompts: tuple[str, ...]  # one prompt, or one per chunk/scene (chunk-wise prompts)
    width: int
    height: int
    num_frames: int  # requested output frames
    steps: int
    seed: int  # always resolved (a random request seed is drawn before the job is stored)
    model: str = "default"  # served variant key, e.g. "magi-1-24b"
    image_path: str | None = None  # stored first frame (i2v)
    video_path: str | None = None  # stored prefix video (v2v)
    trim_to_frames: bool = False  # the hosted APIs return exactly num_frames frames; MAGI-1 itself whole chunks
    window_size: int | None = None
    extra: dict = field(default_factory=dict)  # provider bookkeeping that does not change the video

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        if self.image_path is not None and self.video_path is not None:
            raise ValueError("give an image or a prefix video, not both")

    @property
    def task(self) -> str:
        if self.image_path is not None:
            return "i2v"
        if self.video_path is not None:
            return "v2v"
        return "t2v"

    def shape_key(self) -> tuple:
        """Requests with equal keys run the same sequence of model calls and can share batched DiT calls."""
        return (self.model, self.task, self.width, self.height, self.num_frames, self.steps, self.window_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GenerationParams":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
