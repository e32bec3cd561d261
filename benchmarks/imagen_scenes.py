"""The peer for the scenes cascade: imagen-pytorch's cascade 16 -> 32 -> 64 trained on the captioned MNIST
scenes for the same CPU minutes (process CPU time) per stage as difflab's (benchmarks/scenes_cascade.py),
sampled on the same 1,000 benchmark prompts and scored by the same scene evaluator. Benchmark environment only:

    OMP_NUM_THREADS=1 /work/benchenv/bin/python benchmarks/imagen_scenes.py --minutes 8 --threads 1

imagen-pytorch encodes captions with T5, which cannot be downloaded here; BENCHMARKS.md's offline trick
gives ``import imagen_pytorch`` a T5 config (no weights), and the captions reach it as text embeddings:
the scene-vocabulary tokens of difflab's miniature tokenizer looked up in a fixed random table (64 wide,
N(0, 1/64), seed 0), zero past the caption. The peer so gets a frozen word embedding and learns the rest
(its cross-attention, attention pooling and text-conditioned norms), where difflab learns its small text
transformer. The peer as configured, each stage its recipe's defaults where a choice is its own:
``Unet(dim=32, num_resnet_blocks=1, attn_heads=2, attn_dim_head=32, layer_attns / layer_cross_attns at the
lowest resolution only)``, dim_mults (1, 2) at 16 and 32, (1, 2, 2) at 64; ``Imagen(image_sizes=(16, 32, 64),
timesteps=(25, 10, 10), cond_drop_prob=0.2)`` (its continuous-time cosine schedule, noise augmentation of
the low-res input with its sampling level 0.2), Adam lr 1e-4 (ImagenTrainer's default), batch 32, EMA 0.995
every step; sampled with cond_scale 3 (= difflab's w = 2).
Writes runs/imagen-scenes/{result.json, stage_K.npz}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def offline_t5_config(home: Path) -> None:
    """BENCHMARKS.md: a T5 config for ``import imagen_pytorch``; no weights are ever read."""
    snap = "0" * 40
    base = home / "hub" / "models--google--t5-v1_1-base"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(snap)
    (base / "snapshots" / snap).mkdir(parents=True, exist_ok=True)
    (base / "snapshots" / snap / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 768}))
    os.environ["HF_HOME"], os.environ["HF_HUB_OFFLINE"] = str(home), "1"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="training CPU minutes per stage (process CPU time)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--cond-scale", type=float, default=3.0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "imagen-scenes"))
    args = ap.parse_args()
    offline_t5_config(Path(tempfile.mkdtemp(prefix="imagen-hf-")))
    import numpy as np
    import torch
    from ema_pytorch import EMA
    from imagen_pytorch import Imagen, Unet

    from difflab.data.scenes import SCENE_WORDS, render_scenes
    from difflab.eval.scenes import evaluate_scenes
    from difflab.text import MiniatureTokenizer, tokenize_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = MiniatureTokenizer(SCENE_WORDS)
    table = torch.randn(tokenizer.n_vocab, 64, generator=torch.Generator().manual_seed(0)) / 8.0

    def embed(captions):
        tokens, mask = tokenize_batch(tokenizer, captions, 16)
        return table[tokens] * mask[..., None], mask

    n_train = 20_000
    scenes = render_scenes("train", 0, np.arange(n_train), sizes=(16, 32, 64))
    # each stage trains on the renders at its own size (the spec's area means), in [0, 1] as imagen takes them
    train_images = {s: torch.from_numpy(scenes.images[s]).permute(0, 3, 1, 2).float() / 255.0
                    for s in (16, 32, 64)}
    train_captions = scenes.captions
    common = dict(dim=32, num_resnet_blocks=1, attn_heads=2, attn_dim_head=32, text_embed_dim=64, max_text_len=16)
    unets = (Unet(**common, dim_mults=(1, 2), layer_attns=(False, True), layer_cross_attns=(False, True)),
             Unet(**common, dim_mults=(1, 2), layer_attns=(False, True), layer_cross_attns=(False, True),
                  lowres_cond=True),
             Unet(**common, dim_mults=(1, 2, 2), layer_attns=(False, False, True),
                  layer_cross_attns=(False, False, True), lowres_cond=True))
    # the last upsampler trains on 32x32 crops of the 64x64 renders, as difflab's configs/scenes-sr32-64.yaml
    imagen = Imagen(unets=unets, image_sizes=(16, 32, 64), text_embed_dim=64, timesteps=(25, 10, 10),
                    cond_drop_prob=0.2, condition_on_text=True, random_crop_sizes=(None, None, 32))
    g = torch.Generator().manual_seed(1)
    stages = []
    for k, unet in enumerate(imagen.unets, start=1):
        saved = out / f"unet_{k}.pt"  # a trained stage is kept, so that sampling can be rerun alone
        if saved.is_file():
            state = torch.load(saved, weights_only=True)
            unet.load_state_dict(state["weights"])
            stages.append(state["info"])
            print(stages[-1], flush=True)
            continue
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        ema = EMA(unet, beta=0.995, update_after_step=0, update_every=1)
        steps, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.process_time() - cpu0 < args.minutes * 60:  # CPU time, as difflab's --max-cpu-minutes
            idx = torch.randint(0, n_train, (32,), generator=g)
            text_embeds, text_masks = embed([train_captions[i] for i in idx.tolist()])
            x = train_images[16 * 2 ** (k - 1)][idx]
            loss = imagen(x, text_embeds=text_embeds, text_masks=text_masks, unet_number=k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update()
            steps += 1
        seconds = time.perf_counter() - t0
        unet.load_state_dict(ema.ema_model.state_dict())
        params = sum(p.numel() for p in unet.parameters())
        stages.append({"unet": k, "steps": steps, "seconds": round(seconds, 1), "params": params,
                       "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),
                       "img_per_s": round(steps * 32 / seconds, 1)})
        torch.save({"weights": unet.state_dict(), "info": stages[-1]}, saved)
        print(stages[-1], flush=True)
    from difflab.data.scenes import reference_captions

    prompts = reference_captions()[: args.n]
    outputs = [[], [], []]
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, args.n, args.batch):
            text_embeds, text_masks = embed(prompts[lo:lo + args.batch])
            images = imagen.sample(text_embeds=text_embeds, text_masks=text_masks, cond_scale=args.cond_scale,
                                   batch_size=len(text_embeds), return_all_unet_outputs=True, use_tqdm=False)
            for k, x in enumerate(images):
                outputs[k].append((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    sampling = time.perf_counter() - t0
    rows = []
    for k, parts in enumerate(outputs):
        u8 = np.concatenate(parts)
        np.savez(out / f"stage_{k}.npz", arr_0=u8)
        m = evaluate_scenes(u8, prompts)
        rows.append({"size": m["size"], **{key: m[key] for key in (
            "digit", "colour", "position", "all_correct", "binding", "fd", "precision", "recall")}})
        print(rows[-1], flush=True)
    import imagen_pytorch

    result = {"stages": stages, "rows": rows, "sampling_seconds": round(sampling), "args": vars(args),
              "imagen_pytorch": imagen_pytorch.__version__ if hasattr(imagen_pytorch, "__version__") else "?",
              "torch": torch.__version__, "command": "benchmarks/imagen_scenes.py " + " ".join(sys.argv[1:])}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
