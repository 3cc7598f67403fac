"""T5TextEncoder on a tiny random T5 and a tiny tokenizer built here (no download): folder layout, tokenization
contract (800 tokens, EOS, pad id 0), shapes, dtypes, determinism and the errors for missing files."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from magi_server.models.text_encoder import T5TextEncoder

VOCAB = ["<pad>", "</s>", "<unk>", "▁", "▁a", "▁cat", "▁dog", "▁runs", "▁on", "▁the", "▁beach", "s", "."]
D_MODEL = 32


def _make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, 0.0 if piece.startswith("<") else -1.0 - 0.1 * i) for i, piece in enumerate(VOCAB)]
    core = Tokenizer(models.Unigram(vocab, unk_id=2))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    # T5 appends EOS to every sequence
    core.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                        special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory):
    """<root>/t5-v1_1-xxl holding a 2-layer, 32-wide T5 encoder and its tokenizer."""
    from transformers import T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("t5")
    folder = root / "t5-v1_1-xxl"
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(VOCAB), d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(str(folder))
    _make_tokenizer().save_pretrained(str(folder))
    return root


@pytest.fixture(scope="module")
def encoder(t5_root):
    return T5TextEncoder.from_pretrained(t5_root)


def test_encode_shapes_and_mask(encoder):
    embeds, mask = encoder.encode(["a cat runs on the beach"], clean=False)
    assert embeds.shape == (1, 800, D_MODEL) and embeds.dtype == torch.float32
    assert mask.shape == (1, 800) and mask.dtype == torch.int64
    assert mask.sum().item() == 7  # six words + EOS
    assert mask[0, :7].tolist() == [1] * 7 and mask[0, 7:].sum() == 0
    ids, _ = encoder.tokenize(["a cat runs on the beach"])
    assert ids[0, 6].item() == 1 and ids[0, 7:].eq(0).all()


def _padded(encoder, prompts):
    """The encoding over all max_length tokens, as the reference computes it."""
    ids, attn = encoder.tokenize(prompts)
    with torch.no_grad():
        return encoder.model(input_ids=ids, attention_mask=attn).last_hidden_state, attn


def test_encode_matches_model_and_is_deterministic(encoder):
    prompts = ["a dog", "the cat runs on the beach."]
    first, mask = encoder.encode(prompts, clean=False)
    second, mask2 = encoder.encode(prompts, clean=False)
    assert torch.equal(first, second) and torch.equal(mask, mask2)
    assert mask.sum(-1).tolist() == [3, 8]
    direct, attn = _padded(encoder, prompts)
    assert torch.equal(mask, attn)
    valid = attn.bool()
    # only the valid tokens went through the model: they get the padded encoding's values up to float32
    # summation order, the masked ones are zeros (the DiT never reads them)
    torch.testing.assert_close(first[valid], direct[valid], rtol=1e-5, atol=1e-5)
    assert first[~valid].eq(0).all()
    assert encoder.model.dtype == torch.float32


def test_each_prompt_runs_alone_up_to_its_last_valid_token(encoder, monkeypatch):
    seen = []
    forward = encoder.model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", spy)
    embeds, mask = encoder.encode(["a dog", "the cat runs on the beach."], clean=False)
    assert seen == [(1, 3), (1, 8)] and embeds.shape == (2, 800, D_MODEL) and mask.shape == (2, 800)
    # so a prompt's embedding does not depend on what it is encoded with
    alone, _ = encoder.encode(["a dog"], clean=False)
    assert torch.equal(alone[0], embeds[0])


def test_offloaded_weights_give_the_same_encoding(encoder):
    """offload: the weights stay in host memory and a device copy is made per encode (here the device is the CPU,
    so the copy is the weights themselves): the same numbers as the resident encoder."""
    offloaded = T5TextEncoder(encoder.model, encoder.tokenizer, offload=True)
    prompts = ["a dog", "the cat runs on the beach."]
    a, mask_a = encoder.encode(prompts, clean=False)
    b, mask_b = offloaded.encode(prompts, clean=False)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)


def test_bf16_is_refused_on_the_cpu(t5_root):
    with pytest.raises(ValueError, match="float32 on the CPU"):
        T5TextEncoder.from_pretrained(t5_root, dtype=torch.bfloat16)


def test_clean_false_lowercases_and_strips(encoder):
    a, _ = encoder.encode(["  A Cat  "], clean=False)
    b, _ = encoder.encode(["a cat"], clean=False)
    assert torch.equal(a, b)


def test_folder_itself_is_accepted(t5_root):
    enc = T5TextEncoder.from_pretrained(t5_root / "t5-v1_1-xxl", max_length=16)
    embeds, mask = enc.encode(["a cat"], clean=False)
    assert embeds.shape == (1, 16, D_MODEL) and mask.sum().item() == 3


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        T5TextEncoder.from_pretrained(missing)
    message = str(info.value)
    assert str(missing) in message and "t5-v1_1-xxl" in message and "download" in message


def test_missing_tokenizer_error(tmp_path, t5_root):
    folder = tmp_path / "t5-v1_1-xxl"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((t5_root / "t5-v1_1-xxl" / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        T5TextEncoder.from_pretrained(tmp_path)


def test_encode_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError):
        encoder.encode("a cat")


@pytest.mark.skipif(importlib.util.find_spec("magi_server.models.caption_cleaning") is None,
                    reason="magi_server.models.caption_cleaning is not written yet")
def test_encode_cleans_prompts(encoder):
    from magi_server.models.caption_cleaning import preprocess_prompt

    raw = "A cat runs on the beach https://example.com/x.jpg"
    cleaned, mask = encoder.encode([raw])
    expected, expected_mask = encoder.encode([preprocess_prompt(raw)], clean=False)
    assert torch.equal(cleaned, expected) and torch.equal(mask, expected_mask)
