"""What a run asks the model for: phrases, templates, negative prompts and exemplars, and the rules
that turn them into one conditional embedding per prompt (numpy only; no torch here).

Rules (the README's Prompts section says the same; tests check each one):

* **Templates.** Each phrase is put through every template (``"an aerial photo of {}."``); the
  text embeddings ``u_t`` are L2-normalised and averaged, as CLIP's zero-shot ensembles do, and the
  average is rescaled to the mean length of the ``u_t``:
  ``e = mean_t(u_t/|u_t|) / |mean_t(u_t/|u_t|)| * mean_t |u_t|``. CLIPSeg's FiLM decoder was trained
  on unnormalised CLIP embeddings, so the ensemble keeps their scale and only its direction changes.
  With a single template (``--templates none`` is the bare phrase) the embedding is left untouched,
  so ``none`` reproduces a plain-phrase run bit for bit.
* **Exemplars.** The image embeddings of a class's exemplar crops are combined by the same rule.
* **Mixing.** A prompt with both a phrase and exemplars gets ``(1 - w) * text + w * image`` with
  ``w = exemplar_weight`` (default 0.5): the linear interpolation between text and visual
  conditionals that CLIPSeg was trained with. ``w = 1`` uses the exemplars only.
* **Negatives.** Negative phrases get embeddings like the positives (same templates) and run in the
  same batched decoder call. Per pixel, prompt ``k`` keeps ``p_k * (1 - max_j p_neg_j)`` over the
  negatives ``j`` that apply to it: unchanged where no negative fires, suppressed in proportion to
  the strongest one. A negative is global (``--negative road``: every prompt) or belongs to one
  prompt (``--negative building=road``). The output still has one band per positive prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

#: A plain phrase, as today: the embedding of the text itself.
NONE_TEMPLATES = ("{}",)

#: The default remote-sensing ensemble. Phrases describing imagery from above steer CLIP away from
#: its ground-level photo prior; the bare phrase stays in because CLIPSeg was trained on phrases.
AERIAL_TEMPLATES = (
    "{}",
    "an aerial photo of {}.",
    "a satellite image of {}, top-down view.",
    "an overhead view of {}.",
    "a remote sensing image showing {}.",
    "{} seen from above.",
)

TEMPLATE_SETS = {"none": NONE_TEMPLATES, "aerial": AERIAL_TEMPLATES}

#: Default weight of the exemplar (image) embedding when a prompt has a phrase and exemplars.
EXEMPLAR_WEIGHT = 0.5


def load_templates(spec: str) -> tuple[str, ...]:
    """``none``, ``aerial`` or a text file with one template per line, each holding ``{}`` once
    (blank lines and lines starting with ``#`` are skipped)."""
    if spec in TEMPLATE_SETS:
        return TEMPLATE_SETS[spec]
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{spec}: --templates takes none, aerial or a readable text file "
                          f"({type(exc).__name__})") from exc
    out = []
    for no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.count("{}") != 1 or text.replace("{}", "").count("{") or text.replace("{}", "").count("}"):
            raise ConfigError(f"{spec}: line {no}: a template holds '{{}}' exactly once (where the phrase "
                              f"goes) and no other braces, got {text!r}")
        out.append(text)
    if not out:
        raise ConfigError(f"{spec}: no templates in the file (one per line, each with '{{}}')")
    if len(set(out)) != len(out):
        raise ConfigError(f"{spec}: a template is listed twice")
    return tuple(out)


def parse_negatives(specs: Sequence[str],
                    prompts: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """``--negative`` values → (distinct negative phrases, per prompt the indices that apply).

    ``road`` applies to every prompt; ``building=road`` only to the prompt ``building`` (the part
    before the first ``=`` must then be one of the prompts).
    """
    phrases: list[str] = []
    applies: list[set[int]] = [set() for _ in prompts]
    for spec in specs:
        target, sep, text = spec.partition("=")
        if not sep:
            target, text = "", spec
        text = text.strip()
        if not text:
            raise ConfigError(f"--negative {spec!r}: empty negative phrase")
        if sep and target not in prompts:
            raise ConfigError(f"--negative {spec!r}: {target!r} is not a --prompt (use PROMPT=PHRASE for one "
                              f"prompt, or PHRASE alone for all prompts)")
        if text in prompts:
            raise ConfigError(f"--negative {spec!r}: {text!r} is also a --prompt; a phrase cannot be both")
        if text not in phrases:
            phrases.append(text)
        j = phrases.index(text)
        for k, p in enumerate(prompts):
            if not sep or p == target:
                applies[k].add(j)
    return tuple(phrases), tuple(tuple(sorted(a)) for a in applies)


@dataclass(frozen=True)
class PromptPlan:
    """Everything the model needs to build a run's conditional embeddings (once per run).

    Embedding rows are the positive prompts in order, then the distinct negatives.
    ``exemplars[k]`` holds prompt ``k``'s prepared crops ``(n, 3, S, S)`` float32 0..1, or None.
    """

    prompts: tuple[str, ...]
    templates: tuple[str, ...] = NONE_TEMPLATES
    negatives: tuple[str, ...] = ()
    applies: tuple[tuple[int, ...], ...] = ()
    exemplars: tuple[np.ndarray | None, ...] = ()
    exemplar_weight: float = EXEMPLAR_WEIGHT
    exemplar_ids: tuple[tuple[str, ...], ...] = field(default=(), compare=False)

    def __post_init__(self):
        if not self.applies:
            object.__setattr__(self, "applies", tuple(() for _ in self.prompts))
        if not self.exemplars:
            object.__setattr__(self, "exemplars", tuple(None for _ in self.prompts))
        if not 0.0 <= self.exemplar_weight <= 1.0:
            raise ConfigError(f"--exemplar-weight must be in 0..1, got {self.exemplar_weight}")

    @property
    def phrases(self) -> tuple[str, ...]:
        """Every phrase that needs an embedding: positives, then negatives."""
        return self.prompts + self.negatives

    def expand(self, phrase: str) -> tuple[str, ...]:
        return tuple(t.replace("{}", phrase) for t in self.templates)

    @property
    def plain(self) -> bool:
        """No templates and no exemplars: the embeddings are those of the phrases themselves."""
        return len(self.templates) == 1 and self.templates[0] == "{}" and not self.has_exemplars

    @property
    def has_exemplars(self) -> bool:
        return any(e is not None for e in self.exemplars)

    def exemplars_sha256(self) -> str | None:
        """Hash of the prepared crops (and which prompt each serves): part of the resume fingerprint."""
        if not self.has_exemplars:
            return None
        h = hashlib.sha256()
        for k, crops in enumerate(self.exemplars):
            if crops is not None:
                h.update(f"{k}:{crops.shape}".encode())
                h.update(np.ascontiguousarray(crops, np.float32).tobytes())
        return h.hexdigest()

    def fingerprint_fields(self) -> dict:
        """What of the plan changes the output pixels (the resume fingerprint): the resolved
        templates (a template file's content, not its name) and the exemplar crops."""
        return {"templates": list(self.templates), "exemplars_sha256": self.exemplars_sha256()}

    def describe(self) -> dict:
        """What the manifest records about the prompts (texts as the model saw them)."""
        return {
            "templates": list(self.templates),
            "expanded": {p: list(self.expand(p)) for p in self.phrases},
            "negatives": {p: [self.negatives[j] for j in self.applies[k]] for k, p in enumerate(self.prompts)},
            "exemplar_weight": self.exemplar_weight if self.has_exemplars else None,
            "exemplars": {p: list(ids) for p, ids in zip(self.prompts, self.exemplar_ids) if ids},
        }


def ensemble(embeddings: np.ndarray) -> np.ndarray:
    """One embedding from several (T, D) of the same prompt: the normalised mean direction of the
    unit vectors, at the mean original length (module docstring). A single row is returned as is."""
    e = np.asarray(embeddings, np.float64)
    if len(e) == 1:
        return np.asarray(embeddings[0], np.float32)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    mean = (e / norms).mean(axis=0)
    return (mean / np.linalg.norm(mean) * norms.mean()).astype(np.float32)


def mix(text: np.ndarray, image: np.ndarray, weight: float) -> np.ndarray:
    """Linear interpolation ``(1 - weight) * text + weight * image`` (CLIPSeg's text/visual mix)."""
    return ((1.0 - weight) * np.asarray(text, np.float64) + weight * np.asarray(image, np.float64)).astype(np.float32)


def embeddings_sha256(embeddings: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(embeddings, np.float32).tobytes()).hexdigest()


def apply_negatives(probs: Any, applies: Sequence[Sequence[int]]) -> Any:
    """(N, P + Q, H, W) model probabilities → (N, P, H, W): ``p_k * (1 - max_j p_neg_j)``.

    ``applies[k]`` lists the negatives (0..Q-1, rows P + j) that apply to prompt ``k``; a prompt
    without negatives is passed through unchanged (bit for bit). Works on numpy arrays (host path)
    and torch tensors (device path) alike: the max is taken with a mask product, exact for both.
    """
    n_pos = len(applies)
    out = probs[:, :n_pos]
    if probs.shape[1] == n_pos:
        return out
    out = out.clone() if hasattr(out, "clone") else out.copy()
    for k, negs in enumerate(applies):
        if negs:
            strongest = probs[:, n_pos + negs[0]]
            for j in negs[1:]:
                other = probs[:, n_pos + j]
                larger = other > strongest
                strongest = other * larger + strongest * ~larger  # one term is exactly 0
            out[:, k] *= 1.0 - strongest
    return out


def build_plan(config, info) -> PromptPlan:
    """The run's :class:`PromptPlan` from a ``SegmentConfig``: templates resolved, negatives parsed,
    exemplar polygons read through the run's read path (``geoseg.exemplars``) on the client, once."""
    negatives, applies = parse_negatives(config.negatives, config.prompts)
    exemplars: tuple = ()
    ids: tuple = ()
    if config.exemplars or config.exemplar:
        from .exemplars import parse_sources, read_exemplars

        sources = parse_sources(config.exemplars, config.class_field, config.exemplar)
        for s in sources:
            if s.prompt is not None and s.prompt not in config.prompts:
                raise ConfigError(f"--exemplar {s.prompt}={s.path}: {s.prompt!r} is not a --prompt")
        exemplars, ids = read_exemplars(sources, info, config.prompts)
    return PromptPlan(config.prompts, load_templates(config.templates), negatives, applies, exemplars,
                      config.exemplar_weight, ids)
