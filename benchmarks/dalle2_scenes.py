"""The peer for the scenes unCLIP: DALLE2-pytorch's diffusion prior and decoder trained on the captioned MNIST
scenes at 16x16 for the same CPU minutes (process CPU time) each as difflab's prior and decoder, on the SAME CLIP
(a difflab ``task: clip`` run, so only prior and decoder are compared), sampled on the same benchmark prompts
and scored by the same scene evaluator. Benchmark environment only:

    OMP_NUM_THREADS=1 /work/benchenv/bin/python benchmarks/dalle2_scenes.py --clip RUN --minutes 8 --threads 1

(``--sample-only`` reuses the saved prior.pt / decoder.pt and samples again; without ``--clip`` a randomly
initialised tiny CLIP, seed 0, stands in: smoke tests only.) DALLE2-pytorch takes precomputed CLIP features
(``clip=None``), so per training batch, under no_grad and inside the CPU budget (``clip_cpu_seconds`` in
result.json says how much of it), difflab's CLIP gives: tokens, lens = ``clip_tokens``; ``pooled, seq =
encode_text``; text_embed = F.normalize(pooled); text_encodings = seq with the positions past EOT zeroed (how
DALLE2-pytorch reads the mask: ``any(text_encodings != 0, -1)``; the padding becomes its learned null tokens);
image_embed = ``image_embeddings(x)`` (unit norm, as its CLIP adapters give). ``DiffusionPrior.sample`` needs a
CLIP to embed the text (its best-of-2 reranks by text-image similarity), so the prior gets
``DifflabClipAdapter``, a ``BaseClipAdapter`` around difflab's CLIP computing those same features.

The peer as configured, its own defaults where a choice is its own:
- prior: ``DiffusionPriorNetwork(dim=E, depth=8, dim_head=64, heads=8, max_text_len=L)`` (E = CLIP's embed_dim,
  L its context length; ff_mult 4, rotary embeddings, continuous time embedding: its defaults; 1.02M parameters
  at E = 64) in ``DiffusionPrior(image_embed_dim=E, timesteps=1000, sample_timesteps=64, cond_drop_prob=0.2,
  condition_on_text_encodings=True)`` (its defaults: predict x_0, l2 loss, cosine schedule, embeddings scaled
  by sqrt(E); cond_drop_prob 0.2 as its README's prior, so that it can be guided; 64 DDIM steps, its eta 1, as its
  README and its prior trainer's eval_timesteps); AdamW via its ``get_optimizer`` with its prior training recipe's
  defaults (DiffusionPriorTrainConfig: lr 1.1e-4, wd 6.02e-2, betas (0.9, 0.99), eps 1e-6, grad-norm clip 0.5),
  EMA beta 0.99 (same config) as its trainer makes it (ema_pytorch defaults: after step 100, every 10 steps,
  warm-up power 2/3).
- decoder: ``Unet(dim=32, dim_mults=(1, 2), num_resnet_blocks=1, image_embed_dim=E, text_embed_dim=W,
  cond_on_text_encodings=True, max_text_len=L)`` (W = the encodings' width; attention 16 heads of 32, cross
  attention at the inner layers, mid self-attention, 4 image tokens: its defaults; 1.23M parameters at E = W = 64)
  in ``Decoder(image_size=16, timesteps=1000, sample_timesteps=50)`` (its defaults: eps prediction, learned
  variance with vb weight 0.001, l2, cosine schedule, image_cond_drop_prob 0.1, text_cond_drop_prob 0.5, static
  clamp of x_0, DDIM with eta 0 when sample_timesteps < timesteps; 50 steps, difflab's scenes sampler count;
  its full 1000 would take hours here); AdamW with its DecoderTrainer / DecoderTrainConfig defaults (lr 1e-4, wd
  0.01, eps 1e-8, grad-norm clip 0.5), EMA beta 0.999 (DecoderTrainConfig) as its trainer makes it.
- batch 32 from the 20,000 train scenes (split train, seed 0) and their captions, each network for --minutes.
- sampling: ``prior.sample(tokens, num_samples_per_batch=2, cond_scale=--prior-cond-scale)`` (its best-of-2,
  reranked by cosine to the text embedding), then ``decoder.sample(image_embed=, text_encodings=,
  cond_scale=--cond-scale)``, from the EMA weights.
Guidance: DALLE2-pytorch's ``forward_with_cond_scale`` is ``null + (cond - null) * cond_scale`` on the network's
output (x_0 for the prior, eps and the variance channels for the decoder; the null drops text and image
embedding together), and difflab's ``eps_u + (1 + w)(eps_c - eps_u)`` is the same combination, so cond_scale =
1 + w (the same on x_0: eps is affine in x_0 at fixed x_t); default --cond-scale 3 = difflab's w = 2 for the
decoder, and --prior-cond-scale 1 (no prior guidance: its DALLE2.forward default prior_cond_scale).

The prior's own metrics (``prior`` in result.json), on the n prompts, against the TRUE image embeddings z_i of
the prompts' reference scenes (``reference_scenes(16)``: test split, seed 0, indices 0..n-1, whose captions are
the prompts) in the same CLIP: the mean cosine of the prior's sample to z_i (best-of-2 and plain, num_samples_per_
batch 1) beside the mean cosine of the text embedding z_t to z_i; and top-1 retrieval: the fraction of prompts
whose embedding is nearest (cosine), among the n reference scenes' z_i, to a scene with the prompt's own caption.
Writes runs/dalle2-scenes/{result.json, samples.npz (arr_0 uint8 [n, 16, 16, 3]), prior.pt, decoder.pt}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIOR_NET = dict(depth=8, dim_head=64, heads=8)
PRIOR = dict(timesteps=1000, sample_timesteps=64, cond_drop_prob=0.2, condition_on_text_encodings=True)
PRIOR_OPT = dict(lr=1.1e-4, wd=6.02e-2, eps=1e-6, max_grad_norm=0.5, ema_beta=0.99)
UNET = dict(dim=32, dim_mults=(1, 2), num_resnet_blocks=1, cond_on_text_encodings=True)
DECODER = dict(image_size=16, timesteps=1000, sample_timesteps=50)
DECODER_OPT = dict(lr=1e-4, wd=0.01, eps=1e-8, max_grad_norm=0.5, ema_beta=0.999)
BATCH, N_TRAIN = 32, 20_000


def load_difflab_clip(run: str | None):
    """difflab's CLIP (eval mode, with ``.tokenizer``): ``difflab.clip_features.load_clip(RUN)``, or the random
    tiny one (seed 0)."""
    import torch

    if run is not None:
        from difflab.clip_features import load_clip

        return load_clip(run)
    from difflab.data.scenes import SCENE_WORDS
    from difflab.nn.openai_clip import CLIP, CLIPConfig
    from difflab.text import MiniatureTokenizer

    tokenizer = MiniatureTokenizer(SCENE_WORDS)
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(embed_dim=64, image_resolution=16, vision_layers=2, vision_width=64, vision_patch_size=4,
                           context_length=16, vocab_size=tokenizer.n_vocab, transformer_width=64,
                           transformer_heads=4, transformer_layers=2)).eval()
    clip.tokenizer = tokenizer
    return clip


def make_adapter(clip):
    """A ``BaseClipAdapter`` giving DALLE2-pytorch difflab's CLIP features (text: tokens padded with 0)."""
    import torch
    import torch.nn.functional as F
    from dalle2_pytorch.dalle2_pytorch import BaseClipAdapter, EmbeddedImage, EmbeddedText

    class DifflabClipAdapter(BaseClipAdapter):
        @property
        def dim_latent(self):
            return self.clip.config.embed_dim

        @property
        def image_size(self):
            return self.clip.config.image_resolution

        @property
        def image_channels(self):
            return 3

        @property
        def max_text_len(self):
            return self.clip.config.context_length

        @torch.no_grad()
        def embed_text(self, text):
            lens = (text != 0).sum(-1)  # SOT .. EOT; the tokenizers pad with 0
            pooled, seq = self.clip.encode_text(text, lens)
            c = self.clip.config
            if c.transformer_width != c.embed_dim:  # the prior's tokens are E wide: project as the pooled one
                seq = seq @ self.clip.text_projection
            keep = torch.arange(seq.shape[1], device=seq.device)[None] < lens[:, None]
            return EmbeddedText(F.normalize(pooled.float(), dim=-1), seq.float() * keep[..., None])

        @torch.no_grad()
        def embed_image(self, image):  # DALLE2-pytorch's images are in [0, 1]; difflab's CLIP takes [-1, 1]
            return EmbeddedImage(self.clip.image_embeddings(image * 2 - 1), None)

    return DifflabClipAdapter(clip)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training CPU minutes per network (process CPU time)")
    ap.add_argument("--prior-minutes", type=float, default=None, help="the prior's CPU minutes (default --minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--cond-scale", type=float, default=3.0, help="decoder guidance (1 + difflab's w)")
    ap.add_argument("--prior-cond-scale", type=float, default=1.0, help="prior guidance (1 + w; 1: none)")
    ap.add_argument("--clip", default=None, help="a difflab CLIP run folder (default: random tiny CLIP, smoke only)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "dalle2-scenes"))
    ap.add_argument("--sample-only", action="store_true", help="reuse the saved prior.pt / decoder.pt")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # its samplers print a bar per step
    import numpy as np
    import torch
    import torch.nn.functional as F
    from dalle2_pytorch import Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet
    from dalle2_pytorch.optimizer import get_optimizer
    from ema_pytorch import EMA

    from difflab.clip_guidance import clip_tokens
    from difflab.data.scenes import reference_captions, reference_scenes, render_scenes
    from difflab.eval.scenes import evaluate_scenes

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = load_difflab_clip(args.clip)
    for p in clip.parameters():
        p.requires_grad_(False)
    adapter = make_adapter(clip)
    c = clip.config
    E, L = c.embed_dim, c.context_length
    W = c.transformer_width if c.transformer_width == c.embed_dim else c.embed_dim
    torch.manual_seed(0)
    net = DiffusionPriorNetwork(dim=E, max_text_len=L, **PRIOR_NET)
    prior = DiffusionPrior(net, clip=adapter, image_embed_dim=E, image_size=c.image_resolution, **PRIOR)
    unet = Unet(image_embed_dim=E, text_embed_dim=W, max_text_len=L, **UNET)
    decoder = Decoder(unet, **DECODER)
    unet = decoder.unets[0]  # Decoder may rebuild it (learned variance: 6 output channels)
    config = {"clip": args.clip or "random tiny CLIP (seed 0)", "E": E, "W": W, "L": L, "batch": BATCH,
              "n_train": N_TRAIN, "prior_net": PRIOR_NET, "prior": PRIOR, "prior_opt": PRIOR_OPT,
              "unet": {**UNET, "dim_mults": list(UNET["dim_mults"])}, "decoder": DECODER, "decoder_opt": DECODER_OPT,
              "ema": "ema_pytorch defaults as its trainers: update_after_step 100, update_every 10, power 2/3"}

    def features(tokens, x=None):
        """CLIP features under no_grad: (text_embed, text_encodings, image_embed or None); x in [0, 1]."""
        with torch.no_grad():
            text_embed, text_encodings = adapter.embed_text(tokens)
            image_embed = adapter.embed_image(x).image_embed if x is not None else None
        return text_embed, text_encodings, image_embed

    stages = {}
    if args.sample_only:
        for name, module in (("prior", net), ("decoder", unet)):
            state = torch.load(out / f"{name}.pt", weights_only=True)
            if state["config"] != json.loads(json.dumps(config)):
                raise SystemExit(f"{out / name}.pt was trained with another configuration: {state['config']}")
            module.load_state_dict(state["weights"])
            stages[name] = state["info"]
            print(name, stages[name], flush=True)
    else:
        scenes = render_scenes("train", 0, np.arange(N_TRAIN), sizes=(16,))
        train_images = torch.from_numpy(scenes.images[16]).permute(0, 3, 1, 2).float() / 255.0  # [0, 1]
        train_tokens, _ = clip_tokens(clip.tokenizer, scenes.captions, L)
        g = torch.Generator().manual_seed(1)
        for name, module, model, opt_kw in (("prior", net, prior, PRIOR_OPT), ("decoder", unet, decoder, DECODER_OPT)):
            opt = get_optimizer(module.parameters(), lr=opt_kw["lr"], wd=opt_kw["wd"], eps=opt_kw["eps"])
            ema = EMA(module, beta=opt_kw["ema_beta"])
            model.train()
            clip.eval()
            steps, clip_cpu, t0, cpu0 = 0, 0.0, time.perf_counter(), time.process_time()
            budget = args.prior_minutes if name == "prior" and args.prior_minutes is not None else args.minutes
            while time.process_time() - cpu0 < budget * 60:  # CPU time, as difflab's --max-cpu-minutes
                idx = torch.randint(0, N_TRAIN, (BATCH,), generator=g)
                x = train_images[idx]
                c0 = time.process_time()
                text_embed, text_encodings, image_embed = features(train_tokens[idx], x)
                clip_cpu += time.process_time() - c0
                if name == "prior":
                    loss = prior(text_embed=text_embed, image_embed=image_embed, text_encodings=text_encodings)
                else:
                    loss = decoder(x, image_embed=image_embed, text_encodings=text_encodings)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), opt_kw["max_grad_norm"])
                opt.step()
                ema.update()
                steps += 1
            seconds = time.perf_counter() - t0
            module.load_state_dict(ema.ema_model.state_dict())
            stages[name] = {"steps": steps, "params": sum(p.numel() for p in module.parameters()),
                            "seconds": round(seconds, 1), "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),
                            "clip_cpu_seconds": round(clip_cpu, 1), "img_per_s": round(steps * BATCH / seconds, 1),
                            "last_loss": round(loss.item(), 4)}
            torch.save({"weights": module.state_dict(), "info": stages[name], "config": config}, out / f"{name}.pt")
            print(name, stages[name], flush=True)
        del scenes, train_images

    prompts = reference_captions()[: args.n]
    ref = reference_scenes(16).images[16][: args.n]
    x_ref = torch.from_numpy(np.array(ref)).permute(0, 3, 1, 2).float() / 255.0
    torch.manual_seed(2)
    samples, z_true, z_text, z_prior = [], [], [], {1: [], 2: []}
    t0 = time.perf_counter()
    prior.eval()
    decoder.eval()
    with torch.no_grad():
        for lo in range(0, args.n, args.batch):
            tokens, _ = clip_tokens(clip.tokenizer, prompts[lo:lo + args.batch], L)
            text_embed, text_encodings, image_embed = features(tokens, x_ref[lo:lo + args.batch])
            z_true.append(image_embed)
            z_text.append(text_embed)
            for r in (1, 2):
                z_prior[r].append(prior.sample(tokens, num_samples_per_batch=r, cond_scale=args.prior_cond_scale))
            images = decoder.sample(image_embed=z_prior[2][-1], text_encodings=text_encodings,
                                    cond_scale=args.cond_scale)
            samples.append((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
            print(f"sampled {lo + len(tokens)} / {args.n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    sampling = time.perf_counter() - t0
    u8 = np.concatenate(samples)
    np.savez(out / "samples.npz", arr_0=u8)

    z_true = torch.cat(z_true)
    same = torch.tensor([[a == b for b in prompts] for a in prompts])  # scene j has prompt i's caption

    def prior_metrics(z):
        z = F.normalize(torch.cat(z).float(), dim=-1)
        sims = z @ z_true.t()  # [n prompts, n reference scenes]
        hit = same[torch.arange(len(z)), sims.argmax(1)]
        return {"cos_true": round(float(sims.diagonal().mean()), 4),
                "retrieval_top1": round(float(hit.float().mean()), 4)}

    prior_rows = {"best_of_2": prior_metrics(z_prior[2]), "best_of_1": prior_metrics(z_prior[1]),
                  "text_embedding": prior_metrics(z_text), "n": args.n,
                  "retrieval": "top-1 among the n reference scenes' true z_i: a hit if it has the prompt's caption"}
    print("prior", prior_rows, flush=True)
    m = evaluate_scenes(u8, prompts)
    row = {key: m[key] for key in ("n", "size", "digit", "colour", "position", "all_correct", "binding",
                                   "colour_swaps", "fd", "precision", "recall", "diversity")}
    print(row, flush=True)
    from dalle2_pytorch.version import __version__ as dalle2_version

    result = {"stages": stages, "prior": prior_rows, "row": row, "evaluate_scenes": m, "config": config,
              "sampling_seconds": round(sampling), "args": vars(args),
              "dalle2_pytorch": dalle2_version, "torch": torch.__version__,
              "command": "benchmarks/dalle2_scenes.py " + " ".join(sys.argv[1:])}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
