"""The frozen CLIP that unCLIP's prior and decoder read: files, and the embeddings in unCLIP's space.

unCLIP (Ramesh et al. 2022, Sec. 2) generates through CLIP's embedding space: the prior maps a caption y (its
tokens, and CLIP's text embedding z_t) to an image embedding z_i, the decoder maps z_i (and the caption) to an
image. difflab's embedding space is e = embed_scale * z with z the unit CLIP embedding (default embed_scale =
sqrt(embed_dim): unit RMS per coordinate; the paper scales its ViT-H/16 embeddings by 17.2), for the image and
the pooled text alike.

Notation map (code -> paper):
    e_i [N, E]        embed_scale * z_i, z_i = CLIP image embedding / its norm (the prior's x_0, the decoder's y)
    e_t [N, E]        embed_scale * z_t of the caption (the prior's ``text_emb``, the decoder's ``txt_feat``)
    seq [N, L, W]     CLIP's text token sequence (ln_final output; the prior's ``text_enc``, the decoder's
                      ``txt_feat_seq``); W = E is required (ViT-L/14: 768 and 768), as the networks take one width
    mask [N, L]       True on caption tokens (SOT .. EOT)

Files: :func:`load_clip` reads a ``task: clip`` run folder (its ``clip.safetensors``, written by
:func:`save_clip`), that file, or a ``difflab convert`` folder of an OpenAI / OpenCLIP CLIP (``model.safetensors``
with its ``tokenizer/``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from difflab.nn.openai_clip import CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig

Tensor = torch.Tensor
CLIP_WEIGHTS = "clip.safetensors"  # what a task: clip run writes (and load_clip reads)
KIND = "clip"

__all__ = ["CLIP_WEIGHTS", "save_clip", "load_clip", "CLIPEmbedder", "slerp"]


def save_clip(path: str | os.PathLike, clip: CLIP, text: Any) -> None:
    """``clip``'s weights with its config and tokenizer (a ``TextConfig``), atomically: what :func:`load_clip` reads."""
    from difflab.clip_guidance import save_tagged_network

    save_tagged_network(path, clip, text, KIND)


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu", option: str = "clip.run") -> CLIP:
    """A :class:`CLIP` in eval mode, with its ``tokenizer``, from a ``task: clip`` run folder, its
    ``clip.safetensors``, or a ``difflab convert`` folder of a CLIP. FileNotFoundError / ValueError name ``option``."""
    from difflab.build import load_state_strict
    from difflab.clip_guidance import _tokenizer_of, read_tagged_network
    from difflab.config import from_dict

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{option}: not found: {p}")
    if p.is_dir() and (p / "model.safetensors").is_file():
        return _load_converted(p, device, option)
    if p.is_dir():
        if not (p / CLIP_WEIGHTS).is_file():
            raise ValueError(f"{option} {p}: not a CLIP: neither a task: clip run folder ({CLIP_WEIGHTS}) nor a "
                             "converted CLIP folder (model.safetensors)")
        p = p / CLIP_WEIGHTS
    meta, state = read_tagged_network(p, KIND, option)
    config = from_dict(CLIPConfig, meta["config"])
    clip = _empty(config)
    load_state_strict(clip, state, where=str(p))
    clip.tokenizer = _tokenizer_of(meta["text"], config.vocab_size)
    return clip.to(device).eval().requires_grad_(False)


def _empty(config: CLIPConfig) -> CLIP:
    """A CLIP with uninitialised parameters (every one is loaded) and its fixed buffers."""
    with torch.device("meta"):
        clip = CLIP(config)
    clip = clip.to_empty(device="cpu")
    n = config.context_length
    clip.attn_mask = torch.full((n, n), float("-inf")).triu(1)
    clip.image_mean = torch.tensor(OPENAI_IMAGE_MEAN).view(1, 3, 1, 1)
    clip.image_std = torch.tensor(OPENAI_IMAGE_STD).view(1, 3, 1, 1)
    return clip


def _load_converted(folder: Path, device, option: str) -> CLIP:
    from difflab.clip_guidance import _tokenizer_of
    from difflab.convert import load_converted

    clip = load_converted(folder)
    if not isinstance(clip, CLIP):
        raise ValueError(f"{option} {folder}: a converted {type(clip).__name__}, not a CLIP")
    vocab = folder / "tokenizer"
    if not vocab.is_dir():
        raise FileNotFoundError(f"{option} {folder}: the converted CLIP has no tokenizer/ folder (CLIP's BPE); "
                                "convert it again with --vocab")
    clip.tokenizer = _tokenizer_of({"tokenizer": "clip", "vocab": str(vocab)}, clip.config.vocab_size)
    return clip.to(device).eval().requires_grad_(False)


def slerp(a: Tensor, b: Tensor, theta: float | Tensor) -> Tensor:
    """Spherical interpolation [..., D]: [sin((1 - th) O) a + sin(th O) b] / sin O, cos O = a.b / (|a| |b|)
    (PAPERS.md Sec. 7). th = 0 gives a, th = 1 gives b; for (anti)parallel a, b (sin O ~ 0) the straight line."""
    theta = torch.as_tensor(theta, dtype=a.dtype, device=a.device)
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-6
    sin_safe = torch.where(safe, sin, torch.ones_like(sin))
    curved = (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / sin_safe
    return torch.where(safe, curved, (1 - theta) * a + theta * b)


class CLIPEmbedder:
    """A frozen :class:`CLIP` and its tokenizer, giving the prior's and the decoder's ``**cond`` (module docstring).

    Args:
        clip: a loaded CLIP with a ``tokenizer`` attribute (:func:`load_clip`).
        embed_scale: e = embed_scale * z; None = sqrt(embed_dim).
    """

    def __init__(self, clip: CLIP, embed_scale: float | None = None):
        c = clip.config
        if c.transformer_width != c.embed_dim:
            raise ValueError(f"unCLIP's prior and decoder take CLIP's text sequence at the embedding width: this CLIP "
                             f"has transformer_width {c.transformer_width} != embed_dim {c.embed_dim}")
        if getattr(clip, "tokenizer", None) is None:
            raise ValueError("the CLIP has no tokenizer: load it with difflab.clip_features.load_clip")
        self.clip = clip.eval().requires_grad_(False)
        self.scale = math.sqrt(c.embed_dim) if embed_scale is None else float(embed_scale)
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def config(self) -> CLIPConfig:
        return self.clip.config

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def check_network(self, clip_dim: int, text_ctx: int, what: str) -> None:
        """ValueError unless a prior / decoder of ``clip_dim`` and ``text_ctx`` fits this CLIP."""
        c = self.config
        if clip_dim != c.embed_dim or text_ctx != c.context_length:
            raise ValueError(f"the {what} takes clip_dim {clip_dim} and text_ctx {text_ctx} but its CLIP has embed_dim "
                             f"{c.embed_dim} and context_length {c.context_length}: use the CLIP it was trained with")

    @torch.no_grad()
    def text(self, captions: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(e_t [N, E], seq [N, L, W], mask [N, L] bool) of N captions (each distinct caption encoded once)."""
        from difflab.clip_guidance import clip_tokens

        captions = list(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            tokens, lens = clip_tokens(self.clip.tokenizer, missing, self.config.context_length)
            tokens, lens = tokens.to(self.device), lens.to(self.device)
            pooled, seq = self.clip.encode_text(tokens, lens)
            e_t = self.scale * F.normalize(pooled.float(), dim=-1, eps=1e-12)
            mask = torch.arange(tokens.shape[1], device=self.device)[None] < lens[:, None]
            for i, c in enumerate(missing):
                self._cache[c] = (e_t[i], seq[i].float(), mask[i])
        rows = [self._cache[c] for c in captions]
        return tuple(torch.stack([r[k] for r in rows]) for k in range(3))  # type: ignore[return-value]

    @torch.no_grad()
    def image(self, x: Tensor) -> Tensor:
        """e_i [N, E] of images x [N, 3, S, S] in [-1, 1] (S = the CLIP's image_resolution)."""
        return self.scale * self.clip.image_embeddings(x.to(self.device).float())

    def unit(self, e: Tensor) -> Tensor:
        """z = e / |e| (what CLIP's cosine similarities take)."""
        return F.normalize(e.float(), dim=-1, eps=1e-12)

    def prior_cond(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """The prior's ``**cond``: ``text_emb`` e_t, ``text_enc`` seq, ``mask``."""
        e_t, seq, mask = self.text(captions)
        return {"text_emb": e_t, "text_enc": seq, "mask": mask}

    def decoder_cond(self, captions: Sequence[str], e_i: Tensor | None) -> dict[str, Tensor]:
        """The decoder's ``**cond``: ``y`` e_i with ``y_drop`` all False (e_i None: ``y_drop`` all True, the learned
        null ``cf_param``), ``txt_feat`` e_t, ``txt_feat_seq`` seq, ``mask``."""
        e_t, seq, mask = self.text(captions)
        out = {"txt_feat": e_t, "txt_feat_seq": seq, "mask": mask}
        n = len(e_t)
        if e_i is None:
            out["y"] = torch.zeros(n, self.config.embed_dim, device=e_t.device)
            out["y_drop"] = torch.ones(n, dtype=torch.bool, device=e_t.device)
        else:
            out["y"], out["y_drop"] = e_i.to(e_t), torch.zeros(n, dtype=torch.bool, device=e_t.device)
        return out

    def prior_null(self) -> dict[str, Tensor]:
        """Classifier-free guidance's unconditional half for the prior: the empty caption's features [1, ...]."""
        return self.prior_cond([""])

    def decoder_null(self) -> dict[str, Tensor]:
        """The decoder's: the empty caption and the learned null embedding (``y_drop`` True; unCLIP / Karlo)."""
        null = self.decoder_cond([""], None)
        del null["y"]  # y stays the conditional half's; y_drop swaps it for cf_param
        return null
