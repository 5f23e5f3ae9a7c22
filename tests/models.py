"""Deterministic test segmenters (tests only; the product always runs a real model).

``PerPixelFactory`` builds a translation-equivariant model: each output pixel depends only on the
same input pixel, so a correct tiler/blender must reproduce the whole-image result exactly.
Factories are module-level classes so they pickle by reference to Dask worker processes.
"""

from __future__ import annotations

import numpy as np


class PerPixelSegmenter:
    """p_k(x) = sigmoid(gain * (w_k · rgb(x) - bias_k)); counts its predict calls."""

    calls = 0  # tiles seen in this process (for resume tests with an in-process cluster)
    revision = None

    def __init__(self, weights, bias, gain=12.0):
        self.weights = np.asarray(weights, np.float32)  # (P, 3)
        self.bias = np.asarray(bias, np.float32)        # (P,)
        self.gain = np.float32(gain)

    def encode_prompts(self, prompts):
        return list(range(len(prompts)))

    def predict(self, tiles, embeddings):
        PerPixelSegmenter.calls += len(tiles)
        w, b = self.weights[embeddings], self.bias[embeddings]
        z = np.einsum("pc,nchw->nphw", w, tiles) - b[None, :, None, None]
        return (1.0 / (1.0 + np.exp(-self.gain * z))).astype(np.float32)

    def whole_image(self, rgb, prompts_idx=None):
        """Reference: the model applied to a whole (3, H, W) image at once."""
        idx = list(range(len(self.weights))) if prompts_idx is None else prompts_idx
        return self.predict(rgb[None], idx)[0]


class PerPixelFactory:
    """Picklable factory: prompt k responds to colour weights[k] above bias[k]."""

    def __init__(self, weights=((1.0, 0.0, 0.0),), bias=(0.5,), gain=12.0):
        self.weights, self.bias, self.gain = tuple(map(tuple, weights)), tuple(bias), gain

    def key(self):
        return ("perpixel", self.weights, self.bias, self.gain)

    def __call__(self):
        return PerPixelSegmenter(self.weights, self.bias, self.gain)


class TorchPerPixelSegmenter(PerPixelSegmenter):
    """The same model as a :class:`geoseg.model.TensorSegmenter`: it gets the device-resident chunk
    path (on the CPU here), so the invariants are checked on that path too."""

    device_calls = 0  # tiles seen through predict_tensor: proves the device path ran
    pixel_mean = (0.0, 0.0, 0.0)  # (x - 0) / 1 == x exactly: the model sees the 0..1 tiles
    pixel_std = (1.0, 1.0, 1.0)

    def __init__(self, *args, **kw):
        import torch

        super().__init__(*args, **kw)
        self.device = torch.device("cpu")

    def predict_tensor(self, pixels, embeddings):
        import torch

        PerPixelSegmenter.calls += len(pixels)
        TorchPerPixelSegmenter.device_calls += len(pixels)
        w = torch.from_numpy(self.weights[embeddings])
        b = torch.from_numpy(self.bias[embeddings])
        z = torch.einsum("pc,nchw->nphw", w, pixels) - b[None, :, None, None]
        return torch.sigmoid(float(self.gain) * z)


class TorchPerPixelFactory(PerPixelFactory):
    def key(self):
        return ("torch-perpixel", self.weights, self.bias, self.gain)

    def __call__(self):
        return TorchPerPixelSegmenter(self.weights, self.bias, self.gain)


class ZeroCostSegmenter:
    """Returns zeros at once: measures pipeline overhead (bench only)."""

    def encode_prompts(self, prompts):
        return len(prompts)

    def predict(self, tiles, embeddings):
        return np.zeros((tiles.shape[0], embeddings, *tiles.shape[2:]), np.float32)


class ZeroCostFactory:
    def key(self):
        return ("zero",)

    def __call__(self):
        return ZeroCostSegmenter()


class TensorZeroCostSegmenter:
    """Zeros on the device path: measures the device-resident chunk path's own cost (bench only)."""

    pixel_mean = (0.485, 0.456, 0.406)  # normalise like CLIPSeg, so the bench pays for it
    pixel_std = (0.229, 0.224, 0.225)
    revision = None

    def __init__(self, device="cpu"):
        import torch

        self.device = torch.device(device)

    def encode_prompts(self, prompts):
        return len(prompts)

    def predict(self, tiles, embeddings):
        return np.zeros((tiles.shape[0], embeddings, *tiles.shape[2:]), np.float32)

    def predict_tensor(self, pixels, embeddings):
        import torch

        return torch.zeros((pixels.shape[0], embeddings, *pixels.shape[2:]), device=pixels.device)


class TensorZeroCostFactory:
    def __init__(self, device="cpu"):
        self.device = device

    def key(self):
        return ("tensor-zero", self.device)

    def __call__(self):
        return TensorZeroCostSegmenter(self.device)


# -- position-dependent models: a per-pixel model cannot tell a feathered blend from a plain average
# (any positive weights give the same answer), these can.

class TileConstantSegmenter:
    """Every pixel of a tile gets one value: the tile's red input at its centre pixel (row T//2, col T//2).

    The value differs from tile to tile (noise input), so the blend of overlapping tiles is a visible
    mix whose shape is the blend weights themselves. Same value for every prompt.
    """

    def encode_prompts(self, prompts):
        return len(prompts)

    def predict(self, tiles, embeddings):
        n, _, th, tw = tiles.shape
        centre = tiles[:, 0, th // 2, tw // 2]
        return np.broadcast_to(centre[:, None, None, None], (n, embeddings, th, tw)).astype(np.float32)


class TileConstantFactory:
    def key(self):
        return ("tile-constant",)

    def __call__(self):
        return TileConstantSegmenter()


class BorderFaultySegmenter(PerPixelSegmenter):
    """The per-pixel model in the tile's interior, garbage (``fault``) within ``border`` px of any tile side.

    Models like CLIPSeg are least reliable near the tile border where their context is cut off; the
    blend must suppress that band wherever another tile sees the pixel further inside.
    """

    def __init__(self, weights, bias, gain=12.0, border=8, fault=1.0):
        super().__init__(weights, bias, gain)
        self.border, self.fault = border, np.float32(fault)

    def predict(self, tiles, embeddings):
        out = super().predict(tiles, embeddings)
        k = self.border
        out[..., :k, :] = out[..., -k:, :] = self.fault
        out[..., :, :k] = out[..., :, -k:] = self.fault
        return out


class BorderFaultyFactory(PerPixelFactory):
    """Defaults keep the interior truth in 0.03..0.4 on any input: graded values, and no threshold
    crossings (polygonizing a noise image's speckle would cost seconds and test nothing here)."""

    def __init__(self, weights=((1.0, 0.0, -0.5),), bias=(1.2,), gain=2.0, border=8, fault=1.0):
        super().__init__(weights, bias, gain)
        self.border, self.fault = border, fault

    def key(self):
        return ("border-faulty", *super().key()[1:], self.border, self.fault)

    def __call__(self):
        return BorderFaultySegmenter(self.weights, self.bias, self.gain, self.border, self.fault)


class TextOnlySegmenter:
    """A loaded CLIPSeg seen only through ``encode_prompts``/``predict``: the pre-template path
    (geoseg then gets the bare phrases, encoded as one batch), to compare ``--templates none`` with."""

    def __init__(self, inner):
        self._inner = inner
        self.revision = inner.revision

    def encode_prompts(self, prompts):
        return self._inner.encode_prompts(prompts)

    def predict(self, tiles, embeddings):
        return self._inner.predict(tiles, embeddings)


class TextOnlyClipSegFactory:
    def __init__(self, model_dir):
        self.model_dir = str(model_dir)

    def key(self):
        return ("text-only-clipseg", self.model_dir)

    def __call__(self):
        from geoseg.model.clipseg import ClipSegSegmenter

        return TextOnlySegmenter(ClipSegSegmenter.load(self.model_dir, device="cpu"))
