"""Goldens of CLIP from the peer code: OpenAI's ``clip.model.CLIP`` and OpenCLIP's ``open_clip.CLIP``.

Run with the benchmark venv (it has both packages; difflab is not imported):

    OMP_NUM_THREADS=1 /work/benchenv/bin/python tools/make_clip_goldens.py

Writes ``tests/fixtures/clip/{openai_clip_tiny,open_clip_tiny}.safetensors`` and a ``.json`` beside each (the config,
the seed, the package versions, how the inputs were made). Each safetensors file holds:

    weights.<key>      every entry of the peer model's ``state_dict()`` (float16 on disk: the weights were rounded
                       to float16 *before* the peer ran in float32, so the stored values are exactly the ones used)
    image              [N, 3, S, S] float32, the peer's input: already normalised with OpenAI's mean / std
    tokens             [M, L] int64, SOT ... EOT padded with 0; EOT is the largest id (argmax pooling finds it)
    lens               [M] int64, the count of tokens with SOT and EOT
    image_features     [N, E] ``encode_image(image)``
    text_features      [M, E] ``encode_text(tokens)``
    text_sequence      [M, L, W] the ``ln_final`` output inside ``encode_text`` (read with a forward hook, so it is
                       exactly what the peer's ``encode_text`` computed)
    logits_per_image   [N, M] ``model(image, tokens)``'s logits_per_image

A tiny random CLIP: the peer's own initialisation, then every parameter perturbed (biases and LayerNorm affine
included, which the peers initialise at 0 / 1) so that a wrong bias or norm shows. The vocabulary is 512 ids (the
49,408 rows of the released one would make the file megabytes); ids 510 / 511 stand in for SOT / EOT.
Nothing of the peers' code goes into difflab: only these outputs (goldens) are committed.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "clip"
SEED = 20240601
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = 510, 511
# the tiny CLIP (openai/CLIP build_model's argument names): one ViT block of 2 heads (OpenAI's rule, width / 64), two
# text blocks of 4 heads; 1 ViT block rather than 2 keeps the file under 1 MB
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=128, vision_patch_size=8,
            context_length=77, vocab_size=512, transformer_width=64, transformer_heads=4, transformer_layers=2)


def openai_clip_model():
    """``clip/model.py`` of clip-anytorch, loaded as a module on its own: ``import clip`` runs ``clip/clip.py``,
    which needs ``pkg_resources`` (absent from setuptools >= 81); ``model.py`` needs only torch and numpy."""
    spec = importlib.util.find_spec("clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    mod_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def perturb_(model: torch.nn.Module, g: torch.Generator) -> None:
    """Every parameter += noise at its own scale (LayerNorm weights around 1), then rounded to float16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(torch.log(torch.tensor(1 / 0.05)).half().float())  # exp = 20.0 (not 1/0.07: a change shows)
                continue
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
            p.add_(torch.randn(p.shape, generator=g) * max(scale, 0.02) * 0.5)
            p.copy_(p.half().float())


def inputs(g: torch.Generator):
    n, s = 3, TINY["image_resolution"]
    image01 = torch.rand(n, 3, s, s, generator=g)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    image = (image01 - mean) / std
    lens = torch.tensor([77, 2, 9, 30])  # a full context, an empty caption, two in between
    tokens = torch.zeros(len(lens), TINY["context_length"], dtype=torch.long)
    for i, n_tok in enumerate(lens.tolist()):
        tokens[i, 0], tokens[i, n_tok - 1] = SOT, EOT
        tokens[i, 1:n_tok - 1] = torch.randint(1, SOT, (n_tok - 2,), generator=g)
    return image, tokens, lens


def run(model: torch.nn.Module, image, tokens, open_clip_style: bool) -> dict[str, torch.Tensor]:
    model.eval()
    seen = []
    hook = model.ln_final.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(tokens)
        hook.remove()
        out = model(image, tokens)
        if open_clip_style:  # open_clip: (normalised image_features, normalised text_features, logit_scale.exp())
            img, txt, scale = out[:3]
            logits = scale * img @ txt.t()
        else:  # OpenAI: (logits_per_image, logits_per_text)
            logits = out[0]
    assert len(seen) == 1 and seen[0].shape == (*tokens.shape, TINY["transformer_width"]), [s.shape for s in seen]
    return {"image_features": image_features, "text_features": text_features, "text_sequence": seen[0],
            "logits_per_image": logits}


def write(name: str, model: torch.nn.Module, made_with: str, extra_config: dict, image, tokens, lens):
    sd = model.state_dict()
    outputs = run(model, image, tokens, open_clip_style=name.startswith("open_clip"))
    tensors = {f"weights.{k}": v.half() if v.is_floating_point() else v for k, v in sd.items()}
    for k, v in sd.items():  # the float16 copy is exact (perturb_ rounded every parameter)
        assert not v.is_floating_point() or torch.equal(v.half().float(), v), k
    tensors.update(image=image, tokens=tokens, lens=lens,
                   **{k: v.float().contiguous() for k, v in outputs.items()})
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"))
    info = {
        "made_with": made_with,
        "tool": "tools/make_clip_goldens.py",
        "versions": {p: md.version(p) for p in ("torch", "clip-anytorch", "open_clip_torch", "numpy")},
        "python": sys.version.split()[0],
        "seed": SEED,
        "config": {**TINY, **extra_config},
        "state_dict_keys": len(sd),
        "weights": "perturbed from the peer's initialisation, rounded to float16 values, run in float32",
        "inputs": {"image": "(torch.rand - OpenAI mean) / OpenAI std: what the peer takes",
                   "tokens": f"SOT={SOT} ... EOT={EOT} (the largest id) padded with 0, lens = {lens.tolist()}"},
        "outputs": {k: list(v.shape) for k, v in outputs.items()},
    }
    (OUT / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
    size = (OUT / f"{name}.safetensors").stat().st_size
    print(f"{name}: {len(sd)} keys, {sum(v.numel() for v in sd.values())} values, {size / 1e6:.2f} MB")
    return sd


def main() -> None:
    torch.set_num_threads(1)
    clip_model = openai_clip_model()
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    image, tokens, lens = inputs(g)

    openai = clip_model.CLIP(**TINY).float()
    perturb_(openai, g)
    openai_sd = write("openai_clip_tiny", openai, "clip-anytorch clip.model.CLIP (OpenAI's clip/model.py), float32",
                      {"activation": "quick_gelu"}, image, tokens, lens)

    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=TINY["vision_layers"], width=TINY["vision_width"], head_width=64,
                           patch_size=TINY["vision_patch_size"], image_size=TINY["image_resolution"])
    text = CLIPTextCfg(context_length=TINY["context_length"], vocab_size=TINY["vocab_size"],
                       width=TINY["transformer_width"], heads=TINY["transformer_heads"],
                       layers=TINY["transformer_layers"])
    oc = open_clip.CLIP(TINY["embed_dim"], vision, text, quick_gelu=False).float()
    perturb_(oc, g)
    oc_sd = write("open_clip_tiny", oc, "open_clip.CLIP (ViT towers, quick_gelu=False: exact GELU), float32",
                  {"activation": "gelu"}, image, tokens, lens)
    same = sorted(openai_sd) == sorted(oc_sd)
    shapes = same and all(openai_sd[k].shape == oc_sd[k].shape for k in openai_sd)
    only = {"only_openai": sorted(set(openai_sd) - set(oc_sd)), "only_open_clip": sorted(set(oc_sd) - set(openai_sd))}
    print(f"open_clip's state-dict keys equal OpenAI's: {same} (shapes too: {shapes}); {only}")
    info_path = OUT / "open_clip_tiny.json"
    info = json.loads(info_path.read_text())
    info["keys_equal_openai"] = {"keys": same, "shapes": shapes, **only}
    info_path.write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
