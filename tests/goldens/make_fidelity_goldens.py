"""Make tests/goldens/fidelity_traps.safetensors by running the official OpenAI code (issue 12, item 8).

    python tests/goldens/make_fidelity_goldens.py IMPROVED_DIFFUSION_DIR GUIDED_DIFFUSION_DIR [OUT]

IMPROVED_DIFFUSION_DIR / GUIDED_DIFFUSION_DIR are checkouts of openai/improved-diffusion @1bc7bbb and
openai/guided-diffusion @22e0df8 (MIT); they are imported from there, unmodified, and no code of theirs
is copied here. The file holds only inputs, outputs and counts (float32 / int64), and its metadata
the constructor arguments of each case (JSON):

- ``net/<case>/{x,t,y,out,params}``: official networks that difflab refused before: attention rates
  deeper than the last level (ignored officially), heads that divide only the widths with attention,
  ``num_heads_upsample``. Weights are not stored: every parameter, in sorted state-dict key order, is
  drawn from one ``torch.Generator().manual_seed(0)`` as ``randn(shape) * 0.2`` (difflab's keys equal
  the official ones, so the test draws the same weights).
- ``condfn/{model_t,cond_t}``: the t that the model and ``cond_fn`` receive in guided-diffusion's
  ``p_sample`` and ``ddim_sample`` on ``SpacedDiffusion(space_timesteps(4000, "10"), rescale_timesteps=True)``
  at steps [0, 5, 9] (the same float t for both).
- ``var/<schedule>/<var_type>/{log_variance,variance}``: the official float32 ``p_mean_variance``
  (T = 1000, the fixtures' model function, t = [0, 1, 500, 998, 999]).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

NET_CASES = {
    # improved-diffusion UNetModel: num_heads_upsample, 3 heads that divide only the width with attention
    # (96 at ds 2 and the middle block; the first level, 32 wide, has none), a rate 8 beyond the last level
    "improved_heads_upsample": ("improved_diffusion.unet.UNetModel", dict(
        in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2, 8),
        channel_mult=(1, 3), num_heads=3, num_heads_upsample=6, num_classes=10, use_scale_shift_norm=True)),
    # guided-diffusion UNetModel, legacy order: the same with BigGAN up/down, rates 4 and 16 beyond the last level
    "guided_heads_upsample": ("guided_diffusion.unet.UNetModel", dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(2, 4, 16), channel_mult=(1, 3), num_heads=3, num_heads_upsample=6,
        use_scale_shift_norm=True, resblock_updown=True, num_classes=10, use_new_attention_order=False)),
    # guided-diffusion UNetModel, new order: num_head_channels 48 divides 96 only; num_heads_upsample is then unused
    "guided_head_channels": ("guided_diffusion.unet.UNetModel", dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
        attention_resolutions=(2, 32), channel_mult=(1, 3), num_head_channels=48, num_heads_upsample=5,
        use_new_attention_order=True)),
    # guided-diffusion EncoderUNetModel (noisy classifier): num_head_channels 48, attention pooling
    "guided_classifier": ("guided_diffusion.unet.EncoderUNetModel", dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
        attention_resolutions=(2, 8), channel_mult=(1, 3), num_head_channels=48, use_scale_shift_norm=True,
        resblock_updown=True, pool="attention", num_heads_upsample=7)),
}
# improved-diffusion's create_model from README-style flags: num_heads_upsample, and "16,8,2" at 32 px gives
# the rate 16, which channel_mult (1, 2, 2, 2) never reaches
FLAG_CASES = {
    "improved_flags": ("improved-diffusion", dict(
        image_size=32, num_channels=32, num_res_blocks=1, num_heads=2, num_heads_upsample=4,
        attention_resolutions="16,8,2", learn_sigma=True, class_cond=False, dropout=0.0, use_checkpoint=False,
        use_scale_shift_norm=True)),
}


def fill(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    with torch.no_grad():
        for k in sorted(sd):
            sd[k].copy_(torch.randn(sd[k].shape, generator=g) * 0.2)


def inputs(size: int, classes: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {"x": torch.randn(2, 3, size, size, generator=g), "t": torch.tensor([3, 700])}
    if classes:
        out["y"] = torch.tensor([1, 7])
    return out


def run_net(name: str, model: torch.nn.Module, size: int, classes: bool, tensors: dict) -> None:
    fill(model)
    model.eval()
    inp = inputs(size, classes)
    with torch.no_grad():
        out = model(inp["x"], inp["t"], **({"y": inp["y"]} if classes else {}))
    for k, v in inp.items():
        tensors[f"net/{name}/{k}"] = v
    tensors[f"net/{name}/out"] = out.float().contiguous()
    tensors[f"net/{name}/params"] = torch.tensor(sum(p.numel() for p in model.parameters()))


def main(improved_dir: str, guided_dir: str, out: str) -> None:
    import importlib

    sys.path[:0] = [improved_dir, guided_dir]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, (cls_path, kwargs) in NET_CASES.items():
        module, cls = cls_path.rsplit(".", 1)
        model = getattr(importlib.import_module(module), cls)(**kwargs)
        run_net(name, model, kwargs.get("image_size", 16), "num_classes" in kwargs, tensors)
        meta[f"net/{name}"] = json.dumps({"class": cls_path, "kwargs": kwargs})
    from improved_diffusion.script_util import create_model

    for name, (family, flags) in FLAG_CASES.items():
        model = create_model(**flags)
        run_net(name, model, flags["image_size"], flags["class_cond"], tensors)
        meta[f"net/{name}"] = json.dumps({"family": family, "flags": flags})

    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps

    diffusion = SpacedDiffusion(
        use_timesteps=space_timesteps(4000, "10"), betas=gd.get_named_beta_schedule("cosine", 4000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.RESCALED_MSE, rescale_timesteps=True)
    seen: dict[str, list[torch.Tensor]] = {"model": [], "cond": []}

    def model_fn(x, t, **_):
        seen["model"].append(t.clone())
        return torch.cat([torch.tanh(x), torch.zeros_like(x)], dim=1)

    def cond_fn(x, t, **_):
        seen["cond"].append(t.clone())
        return 0.1 * torch.ones_like(x)

    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 5, 9])
    diffusion.p_sample(model_fn, x, t, cond_fn=cond_fn, model_kwargs={})
    diffusion.ddim_sample(model_fn, x, t, cond_fn=cond_fn, model_kwargs={})
    tensors["condfn/model_t"] = torch.stack(seen["model"])
    tensors["condfn/cond_t"] = torch.stack(seen["cond"])
    meta["condfn"] = json.dumps({"use_timesteps": sorted(space_timesteps(4000, "10")), "T": 4000, "t": t.tolist()})

    tt = torch.tensor([0, 1, 500, 998, 999])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, generator=g)

    def fixture_model(x, t, **_):  # the fixtures' "network" (fixtures/openai/README.md), learned variance
        s = (t.float() / 1000).reshape(-1, 1, 1, 1)
        return torch.cat([torch.tanh(0.7 * x + 0.3 * s) - 0.1 * torch.flip(x, dims=[-1]), torch.sin(1.3 * x - s)], 1)

    for schedule in ("linear", "cosine"):
        for var_type in ("learned_range", "fixed_large", "fixed_small"):
            learned = var_type == "learned_range"
            diffusion = gd.GaussianDiffusion(
                betas=gd.get_named_beta_schedule(schedule, 1000), model_mean_type=gd.ModelMeanType.EPSILON,
                model_var_type=getattr(gd.ModelVarType, var_type.upper()), loss_type=gd.LossType.MSE)
            net = fixture_model if learned else (lambda x, t, **_: fixture_model(x, t)[:, :3])
            p = diffusion.p_mean_variance(net, x, tt, clip_denoised=False)
            for k in ("log_variance", "variance"):
                tensors[f"var/{schedule}/{var_type}/{k}"] = p[k].float().contiguous()
    tensors["var/x"] = x
    tensors["var/t"] = tt
    save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata=meta)
    print(f"wrote {out}: {len(tensors)} tensors, {Path(out).stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    default = str(Path(__file__).with_name("fidelity_traps.safetensors"))
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else default)
