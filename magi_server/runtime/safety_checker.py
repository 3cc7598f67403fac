"""The safety checker: a local image classifier (any `transformers` image-classification checkpoint the operator
points ``--safety-checker`` at) run on sampled frames of every finished chunk, so that a job's output can be
reported (WaveSpeed's ``has_nsfw_contents``) or refused (fal, Magic Hour) as api-compat.md §5 describes.

Which of the model's labels count as "not safe" is the operator's choice (``--safety-labels``, matched without
regard to case against the checkpoint's ``id2label``): a frame is flagged when the probabilities of those labels
add up to ``threshold`` or more, so a checkpoint that splits unsafe content over several labels (porn, hentai,
sexy) is judged by their sum, not by whichever one happens to be on top. A checkpoint whose labels include none of
them, or only them, is refused when the server starts: it could never flag anything, or would flag everything.

Called from the model runner's output worker (one chunk at a time, after its VAE decode); a lock keeps it to one
call at a time when several runners (model variants) share the one checker.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from magi_server.runtime.loading import load_local_transformers

DEFAULT_NSFW_LABELS = ("nsfw", "porn", "hentai", "sexy")
FRAMES_PER_CHUNK = 3  # the first, middle and last frame of each chunk: a 24-frame chunk is one second


def parse_labels(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"nsfw,porn"`` (or a list of names) as lower-case label names, without blanks or repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    labels = []
    for item in items:
        name = str(item).strip().lower()
        if name and name not in labels:
            labels.append(name)
    return tuple(labels)


def sample_frames(frames: np.ndarray, count: int = FRAMES_PER_CHUNK) -> np.ndarray:
    """Up to ``count`` frames spread evenly over ``frames`` (T, H, W, 3), the first and the last included."""
    total = len(frames)
    if total <= count:
        return frames
    picks = np.unique(np.linspace(0, total - 1, count).round().astype(int))
    return frames[picks]


class SafetyChecker:
    """An image classifier and the labels of it that flag a frame."""

    def __init__(self, model, processor, nsfw_labels: Iterable[str] = DEFAULT_NSFW_LABELS, *,
                 threshold: float = 0.5, frames_per_chunk: int = FRAMES_PER_CHUNK,
                 device: str | torch.device = "cpu", source: str = "") -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.threshold = threshold
        self.frames_per_chunk = frames_per_chunk
        self.source = source  # the folder it came from, for /health/ready and the log
        wanted = set(parse_labels(nsfw_labels))
        id2label = {int(i): str(name) for i, name in (model.config.id2label or {}).items()}
        names = ", ".join(id2label[i] for i in sorted(id2label)) or "none"
        self.nsfw_indices = tuple(sorted(i for i, name in id2label.items() if name.strip().lower() in wanted))
        if not self.nsfw_indices:
            raise ValueError(f"--safety-checker: {source or 'the model'} has none of the labels "
                             f"{', '.join(sorted(wanted))} (its labels: {names}); name its NSFW labels with "
                             f"--safety-labels")
        if len(self.nsfw_indices) == len(id2label):
            raise ValueError(f"--safety-checker: every label of {source or 'the model'} ({names}) is an NSFW label: "
                             f"every frame would be flagged; name only its NSFW labels with --safety-labels")
        self.nsfw_labels = tuple(id2label[i] for i in self.nsfw_indices)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, nsfw_labels: Iterable[str] = DEFAULT_NSFW_LABELS, *,
                        device: str | torch.device = "cpu", threshold: float = 0.5) -> "SafetyChecker":
        """Load a local checkpoint folder (no download: ``local_files_only``); ValueError with one line when it is
        not an image classifier with an image processor, or has no NSFW-type label."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model, processor = load_local_transformers(
            path, flag="--safety-checker", kind="an image classification", device=device,
            model_class=AutoModelForImageClassification, companion_class=AutoImageProcessor)
        return cls(model, processor, nsfw_labels, threshold=threshold, device=device, source=str(Path(path)))

    @torch.no_grad()
    def nsfw_scores(self, frames: np.ndarray) -> np.ndarray:
        """Per frame of ``frames`` (T, H, W, 3) uint8: the summed probability of the NSFW labels."""
        images = [np.ascontiguousarray(frame) for frame in frames]
        inputs = self.processor(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        with self._lock:
            logits = self.model(pixel_values=pixels).logits
        probs = logits.float().softmax(dim=-1)[:, list(self.nsfw_indices)].sum(dim=-1)
        return probs.cpu().numpy()

    def check(self, frames: np.ndarray) -> bool:
        """Whether any of the sampled frames of one chunk (T, H, W, 3) uint8 is flagged; False for no frames."""
        if len(frames) == 0:
            return False
        return bool((self.nsfw_scores(sample_frames(frames, self.frames_per_chunk)) >= self.threshold).any())

    def describe(self) -> str:
        return f"{self.source or 'an image classifier'} (flags {', '.join(self.nsfw_labels)})"
