"""CLIPSeg through HuggingFace transformers: the only module that imports torch and transformers.

The stock ``CLIPSegForImageSegmentation.forward`` runs the whole vision encoder once per
(image, prompt) pair. For P prompts over N tiles we instead run the encoder once per tile, stop
after the last layer the decoder reads (``extract_layers``: later layers feed nothing into the
decoder), encode each prompt once per run, and run the light FiLM decoder for all prompts in ONE
batched call of N·P samples (the prompt-independent ``reduces`` run once per tile and broadcast).
Attention uses PyTorch's SDPA kernels (transformers' ``attn_implementation="sdpa"``). The logits
equal the stock forward pass (tested).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import transformers
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from ..config import DEFAULT_MODEL
from ..errors import ModelLoadError, ModelOutOfMemoryError
from ..prompts import PromptPlan, ensemble, mix

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU, unless the user forces one."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _hub_hint(model: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    where = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (
        f"cannot load model '{model}' (HF cache {where}{', HF_HUB_OFFLINE=1' if offline else ''}): "
        f"pre-stage it on a machine with network with "
        f"`huggingface-cli download {model}` (same HF_HOME), or pass --model with a local directory "
        f"made by save_pretrained"
    )


def resolved_revision(model: str, revision: str | None) -> str | None:
    """The commit hash the weights came from (for the run manifest); None for a local directory."""
    if os.path.isdir(model):
        return revision
    try:
        from transformers.utils.hub import resolve_revision

        resolved = resolve_revision(model, revision)  # a str subclass carrying the commit as .resolved
        return getattr(resolved, "resolved", None) or revision
    except Exception:  # best effort: a manifest detail must never fail a run
        return revision


class ClipSegSegmenter:
    """A loaded CLIPSeg model with a shared-encoder, per-prompt-decoder forward pass."""

    def __init__(self, model: CLIPSegForImageSegmentation, processor, device: torch.device,
                 model_id: str, revision: str | None, compile: bool = False):
        self.model = model.eval().to(device)
        self.device = device
        self.model_id = model_id
        self.revision = revision
        self.processor = processor  # `geoseg train` saves it beside the fine-tuned weights
        improc = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.mean = torch.tensor(improc.image_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(improc.image_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.extract_layers = tuple(model.config.extract_layers)
        # bf16 autocast on CUDA where supported (fp16 otherwise); full precision elsewhere.
        self.autocast_dtype = None
        if device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # torch.compile of the encoder + decoder: opt-in (--compile). It costs a compile per new
        # batch shape; bench/bench_gpu.py --compile measures whether it pays.
        self.compiled = compile
        self._forward = torch.compile(self._logits, dynamic=False) if compile else self._logits

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, revision: str | None = None,
             device: str = "auto", compile: bool = False) -> ClipSegSegmenter:
        """Load weights and processor with ``from_pretrained`` (hub id, HF cache or local dir)."""
        transformers.utils.logging.disable_progress_bar()  # geoseg shows its own progress
        try:
            pinned = revision or "main"  # transformers' own default
            try:  # fused scaled-dot-product attention (flash / memory-efficient kernels on CUDA)
                net = CLIPSegForImageSegmentation.from_pretrained(model, revision=pinned,
                                                                  attn_implementation="sdpa")
            except ValueError as exc:  # a transformers build without SDPA for CLIPSeg
                log.info("SDPA attention unavailable (%s); using the default", exc)
                net = CLIPSegForImageSegmentation.from_pretrained(model, revision=pinned)
            processor = CLIPSegProcessor.from_pretrained(model, revision=pinned)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(_hub_hint(model)) from exc
        commit = resolved_revision(model, revision)
        log.info("loaded %s (revision %s, transformers %s)", model, commit, transformers.__version__)
        return cls(net, processor, pick_device(device), model, commit, compile=compile)

    # -- the Segmenter protocol -------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (P, projection_dim) on the CPU: computed once per run, sent to every task."""
        tok = self.tokenizer(list(prompts), padding=True, return_tensors="pt").to(self.device)
        out = self.model.clip.get_text_features(input_ids=tok["input_ids"],
                                                attention_mask=tok["attention_mask"])
        return out.pooler_output.float().cpu()

    @torch.inference_mode()
    def encode_images(self, crops: np.ndarray, batch_size: int = 16) -> torch.Tensor:
        """Visual-prompt embeddings (n, projection_dim) on the CPU for prepared 0..1 crops (n, 3, S, S).

        The stock conditional path (``get_conditional_embeddings(conditional_pixel_values=...)``,
        i.e. ``clip.get_image_features(...).pooler_output``) on the processor's normalisation.
        """
        out = []
        for i in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size], dtype=np.float32)).to(self.device)
            x = (x - self.mean) / self.std
            out.append(self.model.clip.get_image_features(x).pooler_output.float().cpu())
        return torch.cat(out)

    def encode_plan(self, plan: PromptPlan) -> torch.Tensor:
        """The run's conditional embeddings (P + Q, D): positives then negatives (``geoseg.prompts``).

        A plan without templates and exemplars is :meth:`encode_prompts` of its phrases as they are.
        """
        if plan.plain:
            return self.encode_prompts(plan.phrases)
        texts = [t for phrase in plan.phrases for t in plan.expand(phrase)]
        raw = self.encode_prompts(texts).numpy().reshape(len(plan.phrases), len(plan.templates), -1)
        rows = [ensemble(r) for r in raw]
        for k, crops in enumerate(plan.exemplars):
            if crops is not None:
                image = ensemble(self.encode_images(crops).numpy())
                rows[k] = mix(rows[k], image, plan.exemplar_weight)
        return torch.from_numpy(np.stack(rows))

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray, embeddings: torch.Tensor) -> np.ndarray:
        """Sigmoid probabilities (N, P, T, T) for 0..1 RGB tiles (N, 3, T, T).

        On CUDA out-of-memory the batch is halved (down to one tile) before giving up, so a
        ``--batch-size`` tuned on a bigger GPU still runs; at one tile it is raised as
        :class:`ModelOutOfMemoryError`, which the scheduler reports as final (retrying cannot help).
        """
        try:
            return self._predict(tiles, embeddings)
        except torch.cuda.OutOfMemoryError as exc:
            if len(tiles) == 1:
                raise ModelOutOfMemoryError(f"out of memory on {self.device} at one tile: {exc}") from exc
            torch.cuda.empty_cache()
            half = len(tiles) // 2
            log.warning("CUDA out of memory at %d tiles per batch; retrying in halves", len(tiles))
            return np.concatenate([self.predict(tiles[:half], embeddings),
                                   self.predict(tiles[half:], embeddings)])

    def _predict(self, tiles: np.ndarray, embeddings: torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32)).to(self.device)
        return self.predict_tensor((x - self.mean) / self.std, embeddings).cpu().numpy()

    # -- the TensorSegmenter protocol (the device-resident chunk path) ----------------------
    @property
    def pixel_mean(self) -> tuple[float, ...]:
        return tuple(self.mean.flatten().tolist())

    @property
    def pixel_std(self) -> tuple[float, ...]:
        return tuple(self.std.flatten().tolist())

    @torch.inference_mode()
    def predict_tensor(self, pixels: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Float32 sigmoid probabilities (N, P, T, T) on the device for normalised pixels on the device."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            logits = self.logits(pixels, torch.as_tensor(embeddings).to(self.device))
        return torch.sigmoid(logits.float())

    def bytes_per_tile(self, n_prompts: int) -> int:
        """Peak device memory one tile of a batch needs (activations + outputs), for batch sizing.

        Encoder: the hidden state, the three kept activations and the MLP's 4x expansion at 485
        tokens; decoder: per prompt the FiLM'd tokens, the transposed-convolution maps and the
        float32 probabilities. Doubled for allocator slack; an overestimate only shrinks batches.
        """
        cfg = self.model.config
        tokens = (352 // cfg.vision_config.patch_size) ** 2 + 1
        item = 2 if self.autocast_dtype is not None else 4
        enc = tokens * cfg.vision_config.hidden_size * (4 + len(self.extract_layers)) * item
        dec = (tokens * cfg.reduce_dim * 8 * item + 88 * 88 * cfg.reduce_dim * 2 * item + 352 * 352 * 4 * 3)
        return 2 * (enc + n_prompts * dec)

    # -- the forward pass -------------------------------------------------------------------
    def activations(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Vision-encoder activations at ``extract_layers``, stopping after the last one read."""
        vision = self.model.clip.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values, interpolate_pos_encoding=True))
        wanted = set(self.extract_layers)
        acts = {}
        for i, layer in enumerate(vision.encoder.layers[: max(self.extract_layers) + 1]):
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if i in wanted:
                acts[i] = hidden
        return [acts[i] for i in self.extract_layers]

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits (N, P, H, W) of normalised images for every prompt embedding."""
        return self._forward(pixel_values, embeddings)

    def _logits(self, pixel_values: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.decode(self.activations(pixel_values), embeddings)

    def decode(self, activations: Sequence[torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
        """The FiLM decoder for every (tile, prompt) pair in one batch: logits (N, P, H, W).

        The same arithmetic as ``CLIPSegDecoder.forward`` called once per prompt with the prompt's
        embedding repeated N times, but batched: the ``reduces`` projections (prompt-independent)
        run once per tile, the samples are expanded to N·P (index n·P + k) where FiLM conditions
        them, and the attention layers and transposed convolution run once over N·P samples.
        """
        dec = self.model.decoder
        n, p = activations[0].shape[0], embeddings.shape[0]
        out: torch.Tensor | None = None
        for i, (act, layer, reduce) in enumerate(zip(activations[::-1], dec.layers, dec.reduces)):
            r = reduce(act)
            if out is None:
                out = r
            elif out.shape[0] == n * p:  # already per prompt: broadcast the tile's projection
                out = (r[:, None] + out.view(n, p, *out.shape[1:])).flatten(0, 1)
            else:
                out = r + out
            if i == dec.conditional_layer:
                mul = dec.film_mul(embeddings)[None, :, None, :]   # (1, P, 1, R)
                add = dec.film_add(embeddings)[None, :, None, :]
                out = (mul * out[:, None] + add).flatten(0, 1)     # (N·P, L, R)
            out = layer(out, attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
        if out is None or out.shape[0] != n * p:  # conditional_layer beyond the decoder's layers (not in CLIPSeg)
            raise ValueError(f"decoder conditional_layer {dec.conditional_layer} is never reached")
        out = out[:, 1:, :].transpose(1, 2)  # drop the CLS token: (N·P, R, L-1)
        size = int(math.isqrt(out.shape[2]))
        logits = dec.transposed_convolution(out.reshape(n * p, out.shape[1], size, size)).squeeze(1)
        return logits.view(n, p, *logits.shape[1:])


class ClipSegFactory:
    """Picklable recipe for a ClipSegSegmenter; travels to Dask workers instead of the weights."""

    def __init__(self, model: str = DEFAULT_MODEL, revision: str | None = None, device: str = "auto",
                 compile: bool = False):
        self.model, self.revision, self.device, self.compile = model, revision, device, compile

    def __call__(self) -> ClipSegSegmenter:
        return ClipSegSegmenter.load(self.model, self.revision, self.device, self.compile)

    def key(self) -> tuple:
        return ("clipseg", self.model, self.revision, self.device, self.compile)

    def __repr__(self) -> str:
        return (f"ClipSegFactory({self.model!r}, revision={self.revision!r}, device={self.device!r}, "
                f"compile={self.compile!r})")
