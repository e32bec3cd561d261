"""CLIP guidance (GLIDE Sec. 2.3; glide_text2im ``CLIPModel.cond_fn`` and the clip_guided notebook).

A noised CLIP (:class:`difflab.nn.clip.NoisedCLIP`) scores how well a noised image x_t at step t matches a
caption c; its gradient steers every step of a diffusion sampler towards the caption:

    g(x_t, t) = s * grad_{x_t} [ exp(logit_scale) * sum_n z_t[n] . z_i(x_t, t)[n] ]
    z_i = f(x_t, t) / (||f|| + 1e-12),  z_t = g(c) / (||g|| + 1e-12)   (z_t computed once, without gradient)

Notation (code -> paper / official code):
    s               ``scale``: GLIDE's ``grad_scale`` (3 in the notebook; Elo table at s = 2)
    t               the ORIGINAL step 0..T-1 of the diffusion: GLIDE's SpacedDiffusion wraps ``cond_fn`` like the
                    model, and the CLIP looks its step up in w_t, so a respaced chain hands it ``timestep_map[t]``
                    (integers, even for a network fed rescaled float steps)

The gradient acts through :class:`difflab.guidance.ClassifierGuidance`, the one guidance mechanism: ancestral
samplers read mu + Sigma g (GLIDE's p_sample: ``condition_mean``), DDIM / ODE samplers eps - sqrt(1 - abar_t) g
(ADM Alg. 2). Each image's gradient depends only on its own caption (the sum runs over the batch).

Files: :func:`load_noised_clip` reads a folder ``difflab convert --preset glide/clip`` wrote (the released model,
with CLIP's BPE in ``tokenizer/``), a run folder of ``task: noised_clip`` (its ``noised_clip.safetensors``) or
that file itself; the loaded CLIP carries its tokenizer (``clip.tokenizer``) and is in eval mode. See docs/clip.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.guidance import ClassifierGuidance, CondFn
from difflab.nn.clip import NoisedCLIP, NoisedCLIPConfig
from difflab.process import Process

Tensor = torch.Tensor

__all__ = [
    "CLIP_FILE",
    "clip_tokens",
    "clip_text_embeddings",
    "clip_cond_fn",
    "check_clip_fits",
    "clip_guided_denoiser",
    "clip_prompts",
    "ClipGuide",
    "save_noised_clip",
    "load_noised_clip",
]

CLIP_FILE = "noised_clip.safetensors"  # what a task: noised_clip run writes (and load_noised_clip reads)
_META_KEY = "difflab"


def clip_tokens(tokenizer: Any, captions: Sequence[str], max_text_len: int) -> tuple[Tensor, Tensor]:
    """``tokens`` [N, max_text_len] int64 and ``lens`` [N] int64 (SOT and EOT counted) of N captions.

    GLIDE's ``CLIPModel.encode_prompts`` (``padded_tokens_and_len``: [SOT] + ids[:L - 2] + [EOT], padded with 0)
    for CLIP's BPE; any difflab tokenizer's ``padded_tokens_and_mask`` gives the same content, and its mask counts
    the length (SOT to EOT), so the miniature tokenizer works too.
    """
    from difflab.text import tokenize_batch

    tokens, mask = tokenize_batch(tokenizer, list(captions), max_text_len)
    return tokens.long(), mask.sum(1).long()


@torch.no_grad()
def clip_text_embeddings(clip: NoisedCLIP, captions: Sequence[str], tokenizer: Any = None) -> Tensor:
    """z_t [N, n_embd] of N captions (no gradient), with ``tokenizer`` or the CLIP's own ``clip.tokenizer``."""
    tokenizer = tokenizer if tokenizer is not None else getattr(clip, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the noised CLIP has no tokenizer: load it with load_noised_clip or pass tokenizer=")
    device = clip.logit_scale.device
    tokens, lens = clip_tokens(tokenizer, captions, clip.config.max_text_len)
    return clip.text_embeddings(tokens.to(device), lens.to(device))


def clip_cond_fn(clip: NoisedCLIP, z_t: Tensor, scale: float = 1.0) -> CondFn:
    """GLIDE's ``cond_fn(x_t, t, **ignored)`` = s grad_{x_t} exp(logit_scale) sum(z_t . z_i(x_t, t)).

    ``z_t`` [N, n_embd] (:func:`clip_text_embeddings`) is row-aligned with the batch x_t [N, 3, S, S]; ``t`` [N]
    are original steps. The gradient [N, 3, S, S] is taken under ``enable_grad`` on a detached copy of x_t, so it
    works inside the samplers' ``no_grad`` loops; it is float32 and on x_t's device.
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"the CLIP guidance scale must be a finite number, got {scale!r}")
    z_t = z_t.detach()

    def cond_fn(x_t: Tensor, t: Tensor, **_: Any) -> Tensor:
        if z_t.shape[0] != x_t.shape[0]:
            raise ValueError(f"CLIP guidance: {z_t.shape[0]} caption embeddings for a batch of {x_t.shape[0]} images")
        with torch.enable_grad():
            x_in = x_t.detach().float().requires_grad_(True)
            z_i = clip.image_embeddings(x_in, t.to(x_in.device))
            loss = torch.exp(clip.logit_scale.float()) * (z_t.to(z_i) * z_i).sum()
            grad = torch.autograd.grad(loss, x_in)[0]
        return grad * scale

    return cond_fn


def check_clip_fits(config: NoisedCLIPConfig, process: Process, image_size: int | None = None,
                    rtol: float = 1e-6) -> None:
    """Raise ValueError unless the CLIP was trained on ``process``'s noise levels (its n_timesteps rows of w_t,
    alpha_bar of its beta_schedule at every original step ``process`` visits) and sees ``image_size`` images."""
    if image_size is not None and int(image_size) != config.image_size:
        raise ValueError(f"the noised CLIP sees {config.image_size}x{config.image_size} images but the diffusion "
                         f"model makes {image_size}x{image_size}; use a CLIP trained at the model's resolution")
    steps = process.timestep_map
    name = f"{config.beta_schedule}/{config.n_timesteps}"
    if int(steps.max()) >= config.n_timesteps:
        raise ValueError(f"the noised CLIP was trained on {name} steps but the diffusion model has step "
                         f"{int(steps.max())}; use a CLIP trained on the model's schedule")
    mine = Process.named(config.beta_schedule, config.n_timesteps).alphas_cumprod[steps]
    theirs = process.alphas_cumprod
    bad = ~torch.isclose(mine, theirs, rtol=rtol, atol=1e-12)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"the noised CLIP was trained on another noise schedule ({name}): at step {int(steps[i])} "
                         f"its alpha_bar is {float(mine[i]):.6g} but the diffusion model's is {float(theirs[i]):.6g}; "
                         "use a CLIP trained on the model's schedule")


def clip_guided_denoiser(denoiser: Any, clip: NoisedCLIP, captions: Sequence[str] | Tensor, scale: float, *,
                         tokenizer: Any = None, image_size: int | None = None) -> ClassifierGuidance:
    """``denoiser`` guided by ``clip`` towards ``captions`` (N strings, or their z_t [N, n_embd]) at scale s.

    A :class:`~difflab.guidance.ClassifierGuidance` with :func:`clip_cond_fn` whose gradient sees the original
    steps (``original_t``); the CLIP's fit to the model's process (and ``image_size``, when given) is checked.
    Its batch must be the N images of the captions, in order (one wrapper per batch of a sampling run).
    """
    check_clip_fits(clip.config, denoiser.process, image_size)
    if isinstance(captions, Tensor):
        z_t = captions
    else:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("CLIP guidance takes a list of captions (strings), one per image")
        z_t = clip_text_embeddings(clip, captions, tokenizer)
    return ClassifierGuidance(denoiser, cond_fn=clip_cond_fn(clip, z_t, scale), original_t=True)


def clip_prompts(clip: Any, clip_scale: float | None, prompts: Any) -> list[str] | None:
    """The captions CLIP guidance steers a sampling run towards (``draw_samples``), or None without a CLIP.

    ValueError, in the words of ``difflab sample``: a scale without a CLIP, a scale that is not a finite number
    >= 0, a CLIP without prompts. Any run takes prompts with a CLIP (an unconditional model is guided by the CLIP
    alone; a text model also reads them itself)."""
    if clip is None:
        if clip_scale is not None:
            raise ValueError("--clip-scale S needs a noised CLIP (--clip FOLDER_OR_RUN: a difflab convert folder of "
                             "glide/clip or a task: noised_clip run)")
        return None
    if clip_scale is not None and not 0 <= float(clip_scale) < math.inf:
        raise ValueError(f"the CLIP guidance scale must be a finite number >= 0, got {clip_scale}")
    if prompts is None or isinstance(prompts, str) or not len(prompts):
        raise ValueError("--clip: CLIP guidance steers the samples towards captions: give --prompt TEXT (repeatable) "
                         "or --prompts FILE (one caption a line)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[0]!r}")
    return list(prompts)


class ClipGuide:
    """CLIP guidance of a sampling run, batch by batch (:func:`difflab.generate.draw_samples`): sample i is guided
    towards ``prompts[i % len(prompts)]``; each batch gets its own :func:`clip_guided_denoiser`.

    Args:
        clip: a loaded :class:`NoisedCLIP` (with its ``tokenizer``) or a path for :func:`load_noised_clip`.
        scale: s (None: 1).
        prompts, n: the captions and the number of samples.
        denoiser: the (unrespaced) denoiser to guide; the CLIP's fit to its process and to ``image_size`` (the
            sampled side) is checked here, before anything is drawn.
    """

    def __init__(self, clip: Any, scale: float | None, prompts: Sequence[str], n: int, denoiser: Any,
                 image_size: int, device: str | torch.device = "cpu") -> None:
        if isinstance(clip, (str, os.PathLike)):
            clip = load_noised_clip(clip, device)
        if not isinstance(clip, NoisedCLIP):
            raise ValueError(f"--clip: expected a noised CLIP, got a {type(clip).__name__}")
        check_clip_fits(clip.config, denoiser.process, image_size)
        self.clip, self.scale = clip, 1.0 if scale is None else float(scale)
        distinct = list(dict.fromkeys(prompts))
        z = clip_text_embeddings(clip, distinct)
        self.z_t = z[torch.tensor([distinct.index(prompts[i % len(prompts)]) for i in range(n)], device=z.device)]

    def wrap(self, denoiser: Any, lo: int, hi: int) -> ClassifierGuidance:
        """``denoiser`` guided for samples lo..hi-1."""
        return ClassifierGuidance(denoiser, cond_fn=clip_cond_fn(self.clip, self.z_t[lo:hi], self.scale),
                                  original_t=True)


# ---------------------------------------------------------------------------------------- files


def _text_spec(text: Any) -> dict[str, Any]:
    """What rebuilds a tokenizer from a :class:`~difflab.config.TextConfig` anywhere: a miniature vocabulary
    file is embedded (its words), a BPE path made absolute."""
    spec = {"tokenizer": text.tokenizer, "vocab": text.vocab}
    if text.vocab != "scenes":
        if text.tokenizer == "miniature":
            from difflab.text import MiniatureTokenizer

            spec["words"] = MiniatureTokenizer.load(text.vocab).words
        else:
            spec["vocab"] = str(Path(text.vocab).resolve())
    return spec


def _tokenizer_of(spec: dict[str, Any], n_vocab: int):
    from difflab.build import build_text_tokenizer
    from difflab.config import TextConfig
    from difflab.text import MiniatureTokenizer

    if "words" in spec:
        return MiniatureTokenizer(spec["words"])
    return build_text_tokenizer(TextConfig(tokenizer=spec["tokenizer"], vocab=spec["vocab"]), n_vocab,
                                "clip.n_vocab")


def save_noised_clip(path: str | os.PathLike, clip: NoisedCLIP, text: Any) -> None:
    """Write the weights as safetensors, with the network config and the tokenizer (a ``TextConfig``) as
    metadata, atomically: what :func:`load_noised_clip` reads."""
    save_tagged_network(path, clip, text, "noised_clip")


def save_tagged_network(path: str | os.PathLike, net: nn.Module, text: Any, kind: str) -> None:
    """``net``'s weights as safetensors with ``{"kind", "config", "text"}`` metadata (its ``config``, the tokenizer
    ``text``), atomically: one file that rebuilds a CLIP (``kind`` noised_clip or clip) and its tokenizer."""
    from safetensors.torch import save_file

    from difflab.config import to_dict
    from difflab.fileio import atomic_write_with

    meta = {"kind": kind, "config": to_dict(net.config), "text": _text_spec(text)}
    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta)}))


def read_tagged_network(path: Path, kind: str, option: str = "--clip") -> tuple[dict, dict[str, Tensor]]:
    """(metadata, state) of a :func:`save_tagged_network` file of ``kind``; ValueError naming ``option`` and the
    file for an unreadable file or another kind."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise ValueError(f"{option}: cannot read {path}: {e}") from None
    meta = json.loads(raw) if raw is not None else {}
    if meta.get("kind") != kind:
        what = kind.replace("_", " ").replace("noised clip", "noised CLIP").replace("clip", "CLIP")
        raise ValueError(f"{option} {path}: not a {what} file (it holds {meta.get('kind') or 'no difflab metadata'})")
    return meta, state


def load_noised_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> NoisedCLIP:
    """A :class:`NoisedCLIP` in eval mode with its ``tokenizer``, from a ``difflab convert --preset glide/clip``
    folder, a ``task: noised_clip`` run folder (its ``noised_clip.safetensors``) or that file.

    Raises FileNotFoundError for a missing path, ValueError for anything that is not a noised CLIP.
    """
    from difflab.config import from_dict

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--clip: not found: {p}")
    if p.is_dir() and (p / "model.safetensors").is_file():  # difflab convert's layout
        return _load_converted_clip(p, device)
    if p.is_dir():
        if not (p / CLIP_FILE).is_file():
            raise ValueError(f"--clip {p}: not a noised CLIP: neither a converted folder (model.safetensors) nor a "
                             f"noised-CLIP run folder ({CLIP_FILE})")
        p = p / CLIP_FILE
    meta, state = read_tagged_network(p, "noised_clip")
    config = from_dict(NoisedCLIPConfig, meta["config"])
    clip = _with_weights(config, state, p)
    clip.tokenizer = _tokenizer_of(meta["text"], config.n_vocab)
    return clip.to(device).eval()


def _with_weights(config: NoisedCLIPConfig, state: dict[str, Tensor], where: Path) -> NoisedCLIP:
    from difflab.build import load_state_strict

    with torch.device("meta"):
        clip = NoisedCLIP(config)
    clip = _rebuffer(clip.to_empty(device="cpu"))  # nothing drawn: every parameter is loaded
    load_state_strict(clip, state, where=str(where))
    return clip


def _rebuffer(clip: NoisedCLIP) -> NoisedCLIP:
    """The non-persistent CLIP statistics, which ``to_empty`` leaves uninitialised."""
    from difflab.nn.clip import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

    emb = clip.image_encoder.blocks["input"]
    emb.channel_means = torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1)
    emb.channel_stds = torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1)
    return clip


def _load_converted_clip(folder: Path, device) -> NoisedCLIP:
    """A folder ``convert_noised_clip`` wrote: model.safetensors + config.yaml + tokenizer/ (CLIP's BPE)."""
    from safetensors.torch import load_file

    from difflab.convert import converted_network_config

    config = converted_network_config(folder)
    if not isinstance(config, NoisedCLIPConfig):
        raise ValueError(f"--clip {folder}: a converted {type(config).__name__.removesuffix('Config')}, not a noised "
                         "CLIP (difflab convert IMAGE_ENC.pt TEXT_ENC.pt --preset glide/clip)")
    if config.encoders != "both":
        raise ValueError(f"--clip {folder}: holds the {config.encoders} encoder alone; convert both files into one "
                         "folder: difflab convert IMAGE_ENC.pt TEXT_ENC.pt --preset glide/clip --out DIR")
    clip = _with_weights(config, load_file(str(folder / "model.safetensors")), folder / "model.safetensors")
    vocab = folder / "tokenizer"
    if not vocab.is_dir():
        raise FileNotFoundError(f"--clip {folder}: the converted CLIP has no tokenizer/ folder (CLIP's BPE); convert "
                                "it again with --vocab")
    clip.tokenizer = _tokenizer_of({"tokenizer": "clip", "vocab": str(vocab)}, config.n_vocab)
    return clip.to(device).eval()
