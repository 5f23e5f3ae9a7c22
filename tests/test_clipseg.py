"""geoseg's CLIPSeg forward pass: encoder once per tile, stops at the last extracted layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPSegForImageSegmentation

from geoseg.model.clipseg import ClipSegSegmenter, pick_device

PROMPTS = ["building", "swimming pool", "tree"]


def test_encoder_runs_once_per_tile_and_stops_after_last_read_layer(tiny_model_dir):
    seg = ClipSegSegmenter.load(str(tiny_model_dir), device="cpu")
    layers = seg.model.clip.vision_model.encoder.layers
    assert len(layers) == 5 and seg.extract_layers == (1, 2, 3)
    calls = [0] * len(layers)
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + len(i[0])))
             for k, layer in enumerate(layers)]
    decoder_calls = []
    hooks.append(seg.model.decoder.register_forward_hook(lambda m, i, o: decoder_calls.append(1)))
    try:
        emb = seg.encode_prompts(PROMPTS)
        tiles = np.random.default_rng(0).random((4, 3, 352, 352), dtype=np.float32)
        probs = seg.predict(tiles, emb)
    finally:
        for h in hooks:
            h.remove()
    assert probs.shape == (4, 3, 352, 352) and probs.dtype == np.float32
    assert calls == [4, 4, 4, 4, 0]  # each tile once through layers 0..3; layer 4 feeds nothing
    assert len(decoder_calls) == len(PROMPTS)


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
        np.testing.assert_allclose(probs[:, k], torch.sigmoid(logits).numpy(), atol=1e-5)


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
