"""The prompt enhancer: a local instruction-tuned causal language model (any `transformers` checkpoint the operator
points ``--prompt-enhancer`` at) that rewrites a short request into the dense, cinematic description MAGI-1 was
trained on, as the reference's own enhancer (a Dify workflow around a hosted LLM) does.

The model is loaded once; :meth:`PromptEnhancer.enhance` is greedy (the same prompt gives the same rewrite, so a
retried request stores the same job) and bounded (``max_new_tokens``). A checkpoint with a chat template gets the
instructions as a system message; one without gets them as a plain preamble. An empty rewrite (a model that said
nothing usable) raises EnhancerError rather than silently sending the original prompt on.

Called from a worker thread (it blocks for the length of a generation); one call at a time, under a lock: the
model is shared and generation is not re-entrant on every backend.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from magi_server.runtime.loading import load_local_transformers

# modelled on the reference's enhancer instructions: describe what is seen and how it moves, one paragraph
SYSTEM_PROMPT = (
    "You rewrite short requests for a video generation model into one vivid paragraph of at most 80 words. "
    "Describe the subject, its appearance and action, the setting, lighting and colours, and how the camera "
    "moves, in plain present-tense sentences. Keep every detail the request gives and add no text overlays, "
    "no dialogue and no lists. Answer with the paragraph only."
)


class EnhancerError(RuntimeError):
    pass


class PromptEnhancer:
    def __init__(self, model, tokenizer, *, max_new_tokens: int = 160, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        max_new_tokens: int = 160) -> "PromptEnhancer":
        """Load a local checkpoint folder (no download: ``local_files_only``); ValueError with one line when it
        is not a causal language model with a tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = load_local_transformers(path, flag="--prompt-enhancer", kind="a causal language model",
                                                   model_class=AutoModelForCausalLM, companion_class=AutoTokenizer,
                                                   device=device)
        return cls(model, tokenizer, max_new_tokens=max_new_tokens, device=device)

    def _inputs(self, prompt: str) -> torch.Tensor:
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                add_generation_prompt=True, return_tensors="pt")
            return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        return tokenizer(f"{SYSTEM_PROMPT}\n\nRequest: {prompt}\nParagraph:", return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def enhance(self, prompt: str) -> str:
        """The rewritten prompt (greedy, at most ``max_new_tokens``); EnhancerError when the model said nothing."""
        input_ids = self._inputs(prompt).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock:
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        text = self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        text = " ".join(text.split())
        if not text:
            raise EnhancerError("the prompt enhancer returned nothing for this prompt")
        return text
