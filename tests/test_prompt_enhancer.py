"""The prompt enhancer (issue #12, acceptance 3): with a tiny causal language model written here (random weights,
a word-level tokenizer), ``enable_prompt_expansion`` sends the model's rewrite to the generation and returns it,
the job keeps both prompts, and a server without an enhancer refuses the field by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from magi_server.composition import load_prompt_enhancer
from magi_server.runtime.prompt_enhancer import PromptEnhancer
from magi_server.serving.app import create_app
from magi_server.serving.cluster import SharedQueue
from magi_server.serving.common import ServerContext
from magi_server.serving.jobs import JobStore
from magi_server.tools import cli
from tests.server_utils import tiny_settings

WORDS = ("a red fox runs through snow at dusk slow camera pans left golden light soft wind trees mountain river "
         "glowing mist close wide shot the over under beside").split()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A GPT-2 of one layer on a 30-word vocabulary, saved as a transformers checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    vocab = {"<unk>": 0, "<eos>": 1, ":": 2, ".": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                           bos_token_id=1, eos_token_id=1))
    with torch.no_grad():
        model.transformer.wte.weight[:4] = 0  # never end early or say only <unk>/punctuation: a rewrite has words
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ctx(tmp_path, **overrides) -> tuple[ServerContext, JobStore]:
    settings = tiny_settings(tmp_path, tmp_path / "cache", **overrides)
    store = JobStore(tmp_path / "jobs.db")
    return ServerContext(settings=settings, store=store, engine=SharedQueue(store), executor=None, model_name="tiny",
                         prompt_enhancer=load_prompt_enhancer(settings)), store


def test_prompt_expansion_runs_the_enhanced_prompt_and_returns_it(tmp_path, tiny_lm):
    expected = PromptEnhancer.from_pretrained(tiny_lm, max_new_tokens=160).enhance("a fox in snow")
    assert expected and expected != "a fox in snow" and set(expected.split()) <= set(WORDS) | {":", "."}
    ctx, store = _ctx(tmp_path, prompt_enhancer=str(tiny_lm))
    try:
        with TestClient(create_app(ctx)) as client:
            r = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={
                "prompt": "a fox in snow", "enable_prompt_expansion": True, "seed": 1, "num_frames": 24,
                "num_inference_steps": 8})
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert data["enhanced_prompt"] == expected
            job = store.get(data["id"])
            assert job.params.prompts == (expected,)  # what the model is given
            assert job.meta["original_prompt"] == "a fox in snow" and job.meta["enhanced_prompt"] == expected
            assert client.get(f"/api/v3/predictions/{data['id']}/result").json()["data"]["enhanced_prompt"] == expected
            plain = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={"prompt": "a fox in snow", "seed": 2})
            assert plain.status_code == 200 and "enhanced_prompt" not in plain.json()["data"]
            assert store.get(plain.json()["data"]["id"]).params.prompts == ("a fox in snow",)
            alone = client.post("/api/v3/prompt/enhance", json={"prompt": "a fox in snow"})
            assert alone.status_code == 200 and alone.json()["data"] == {"prompt": expected,
                                                                         "original_prompt": "a fox in snow"}
    finally:
        store.close()


def test_without_an_enhancer_the_field_is_refused_by_name(tmp_path):
    ctx, store = _ctx(tmp_path)
    try:
        with TestClient(create_app(ctx)) as client:
            r = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={"prompt": "x", "enable_prompt_expansion": True})
            assert r.status_code == 400 and r.json()["message"].startswith("enable_prompt_expansion:"), r.text
            assert "--prompt-enhancer" in r.json()["message"]
            r = client.post("/api/v3/prompt/enhance", json={"prompt": "x"})
            assert r.status_code == 400 and r.json()["message"].startswith("prompt:"), r.text
            ok = client.post("/api/v3/wavespeed-ai/magi-1-24b", json={"prompt": "x", "enable_prompt_expansion": False})
            assert ok.status_code == 200, ok.text
        assert len(store.list()) == 1
    finally:
        store.close()


def test_a_folder_that_is_no_language_model_stops_serve_with_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--device", "cpu", "--db", str(tmp_path / "jobs.db"),
                     "--prompt-enhancer", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prompt-enhancer" in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="not a causal language model"):
        PromptEnhancer.from_pretrained(tmp_path)


def test_a_folder_without_a_model_config_is_refused_before_anything_loads(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["serve", "--device", "cpu", "--db", str(tmp_path / "jobs.db"),
                     "--prompt-enhancer", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no model config" in err and len(err.splitlines()) == 1, err
