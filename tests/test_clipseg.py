"""geoseg's CLIPSeg forward pass: encoder once per tile, stops at the last extracted layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPSegForImageSegmentation

from geoseg.model.clipseg import ClipSegSegmenter, pick_device

from .tolerance import assert_forward_close

PROMPTS = ["building", "swimming pool", "tree"]


def test_encoder_runs_once_per_tile_and_stops_after_last_read_layer(tiny_model_dir):
    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    layers = seg.model.clip.vision_model.encoder.layers
    assert len(layers) == 5 and seg.extract_layers == (1, 2, 3)
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + len(i[0])))
             for k, layer in enumerate(layers)]
    decoder_layer_calls = []  # samples through the decoder's last attention layer, per call
    hooks.append(seg.model.decoder.layers[-1].register_forward_hook(
        lambda m, i, o: decoder_layer_calls.append(len(i[0]))))
    try:
        emb = seg.encode_prompts(PROMPTS)
        tiles = np.random.default_rng(0).random((4, 3, 352, 352), dtype=np.float32)
        probs = seg.predict(tiles, emb)
    finally:
        for h in hooks:
            h.remove()
    assert probs.shape == (4, 3, 352, 352) and probs.dtype == np.float32
    assert calls == [4, 4, 4, 4, 0]  # each tile once through layers 0..3; layer 4 feeds nothing
    assert decoder_layer_calls == [4 * len(PROMPTS)]  # one batched decoder pass over N·P samples


def test_predict_equals_stock_pipeline(tiny_model_dir):
    """predict() on 0..1 tiles = sigmoid(stock forward on processor-normalised pixels)."""
    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    stock = CLIPSegForImageSegmentation.from_pretrained(tiny_model_dir).eval()
    tiles = np.random.default_rng(1).random((2, 3, 352, 352), dtype=np.float32)
    probs = seg.predict(tiles, seg.encode_prompts(PROMPTS[:2]))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(tiles) - mean) / std
    for k, prompt in enumerate(PROMPTS[:2]):
        ids = seg.tokenizer([prompt] * 2, return_tensors="pt")
        with torch.no_grad():
            logits = stock(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                           pixel_values=pixels).logits
        # sigmoid's slope is <= 1/4: a logit error of FORWARD_RTOL * max|logit| (float32 reassociation,
        # see tolerance.py) moves a probability by at most a quarter of it
        assert_forward_close(probs[:, k], torch.sigmoid(logits).numpy(), scale=0.25 * float(logits.abs().max()))


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == expected


def test_missing_model_is_a_geoseg_error(tmp_path, monkeypatch):
    import geoseg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(geoseg.ModelLoadError, match="cannot load model") as err:
        ClipSegSegmenter.load(str(tmp_path / "nowhere"))
    assert isinstance(err.value, OSError)


def test_batched_decoder_equals_one_decoder_call_per_prompt(tiny_model_dir):
    """decode() runs all prompts in one N·P batch; it must equal the stock decoder once per prompt.

    Tolerance: the batched path multiplies the same float32 numbers, but BLAS may block an
    (N·P)-row GEMM differently from an N-row one, so sums can differ in the last bits; 1e-5 on
    logits of magnitude ~1 is a few hundred float32 ulps, far below anything a threshold sees.
    """
    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    emb = seg.encode_prompts(PROMPTS)
    pixels = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 3, 352, 352), dtype=np.float32))
    with torch.inference_mode():
        acts = seg.activations(pixels)
        batched = seg.decode(acts, emb)
        loop = torch.stack([seg.model.decoder(acts, emb[k:k + 1].expand(3, -1)).logits
                            for k in range(len(PROMPTS))], dim=1)
    assert batched.shape == (3, len(PROMPTS), 352, 352)
    assert not torch.equal(batched[:, 0], batched[:, 1])  # prompts really differ
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)


def test_attention_is_sdpa(tiny_model_dir):
    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    assert seg.model.config._attn_implementation == "sdpa"
    assert seg.model.decoder.layers[0].self_attn.config._attn_implementation == "sdpa"


def test_gpu_out_of_memory_at_one_tile_is_a_geoseg_error(tiny_model_dir, monkeypatch):
    """CUDA OOM halves the batch; at one tile it is ModelOutOfMemoryError (the scheduler's cue)."""
    from geoseg.errors import GeosegError, ModelOutOfMemoryError

    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    sizes = []

    def oom(tiles, embeddings):
        sizes.append(len(tiles))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(seg, "_predict", oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(ModelOutOfMemoryError, match="out of memory") as info:
        seg.predict(np.zeros((4, 3, 352, 352), np.float32), seg.encode_prompts(PROMPTS[:1]))
    assert isinstance(info.value, GeosegError) and isinstance(info.value, MemoryError)
    assert sizes[:3] == [4, 2, 1]  # halved down to one tile before giving up
