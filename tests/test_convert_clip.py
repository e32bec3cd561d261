"""CLIP checkpoints (OpenAI / OpenCLIP ViT) -> difflab: every file format, the config from the shapes, bad files."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.cli import main
from difflab.convert import (
    check_clip_state_dict,
    clip_config_from_state_dict,
    convert_clip,
    converted_run_config,
    load_converted,
    read_clip_state_dict,
)
from difflab.nn.openai_clip import CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]

# heads = width / 64 in both towers (OpenAI's rule), so the shapes say the whole config
TINY = CLIPConfig(embed_dim=16, image_resolution=16, vision_layers=2, vision_width=128, vision_patch_size=8,
                  context_length=8, vocab_size=40, transformer_width=64, transformer_heads=1, transformer_layers=2)
GOLDENS = Path(__file__).resolve().parent / "fixtures" / "clip"


def random_clip(config: CLIPConfig = TINY, seed: int = 0) -> CLIP:
    """A CLIP whose every parameter is random (biases and norms too), so a dropped or swapped key shows."""
    torch.manual_seed(seed)
    model = CLIP(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(config: CLIPConfig = TINY):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, config.image_resolution, config.image_resolution, generator=g) * 2 - 1
    tokens = torch.randint(1, config.vocab_size - 1, (3, config.context_length), generator=g)
    lens = torch.tensor([config.context_length, 2, 5])
    for i, n in enumerate(lens.tolist()):
        tokens[i, n - 1] = config.vocab_size - 1  # EOT, the largest id
        tokens[i, n:] = 0
    return x, tokens, lens


def outputs(model: CLIP, config: CLIPConfig = TINY):
    x, tokens, lens = inputs(config)
    with torch.no_grad():
        return (model.encode_image(x), *model.encode_text(tokens, lens), model(x, tokens, lens))


class _Holder(nn.Module):
    """Parameters (and extra buffers) under OpenAI's dotted names, for a TorchScript archive like OpenAI's."""

    def __init__(self, sd: dict, buffers: dict):
        super().__init__()
        for key, value in [*sd.items(), *buffers.items()]:
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            if key in sd:
                module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
            else:
                module.register_buffer(leaf, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.logit_scale


def write(model: CLIP, path: Path, fmt: str) -> Path:
    """``model`` as a checkpoint in format ``fmt``."""
    sd = model.state_dict()
    c = model.config
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pt":
        torch.save(sd, path)
    elif fmt == "open_clip":  # a training checkpoint of OpenCLIP: DDP's module. prefix, the text mask saved
        full = {**sd, "attn_mask": model.attn_mask.clone()}
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in full.items()}}, path)
    elif fmt == "openai_torchscript":  # OpenAI's archive: the weights and three int buffers build_model deletes
        extras = {"input_resolution": torch.tensor(c.image_resolution),
                  "context_length": torch.tensor(c.context_length), "vocab_size": torch.tensor(c.vocab_size)}
        torch.jit.script(_Holder(sd, extras)).save(str(path))
    elif fmt == "difflab_trace":  # a trace of difflab's own CLIP: its non-persistent buffers come along
        x, tokens, lens = inputs(c)
        with pytest.warns(torch.jit.TracerWarning):
            traced = torch.jit.trace_module(model, {"forward": (x, tokens, lens)}, check_trace=False)
        assert {"attn_mask", "image_mean", "image_std"} <= set(traced.state_dict())
        traced.save(str(path))
    else:
        raise AssertionError(fmt)
    return path


FORMATS = {"safetensors": "m.safetensors", "pt": "m.pt", "open_clip": "epoch_3.pt",
           "openai_torchscript": "ViT-T-8.pt", "difflab_trace": "traced.pt"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_converts_and_reloads_to_identical_outputs(tmp_path, fmt):
    model = random_clip()
    src = write(model, tmp_path / FORMATS[fmt], fmt)
    out = convert_clip(src, tmp_path / "out")
    again = load_converted(out).eval()  # eval: nn.MultiheadAttention's fast path, as model's
    assert isinstance(again, CLIP) and again.config == TINY
    for a, b in zip(outputs(again), outputs(model), strict=True):
        assert torch.equal(a, b)
    assert read_clip_state_dict(src)[1] == ("torchscript" if "torchscript" in fmt or "trace" in fmt
                                            else "safetensors" if fmt == "safetensors" else "pt")
    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())


def test_cli_converts_with_activation_and_heads(tmp_path, capsys):
    config = dataclasses.replace(TINY, transformer_heads=4, vision_heads=4, activation="gelu")
    model = random_clip(config)
    src = write(model, tmp_path / "open_clip_pytorch_model.bin", "pt")
    assert main(["convert", str(src), "--family", "clip", "--out", str(tmp_path / "o"), "--activation", "gelu",
                 "--text-heads", "4", "--vision-heads", "4"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    again = load_converted(tmp_path / "o").eval()
    assert again.config == config
    for a, b in zip(outputs(again, config), outputs(model, config), strict=True):
        assert torch.equal(a, b)
    # the default is OpenAI's rule and QuickGELU: the same weights load, as another function
    assert main(["convert", str(src), "--family", "clip", "--out", str(tmp_path / "d")]) == 0
    default = load_converted(tmp_path / "d").eval()
    assert default.config == dataclasses.replace(config, transformer_heads=1, vision_heads=None,
                                                 activation="quick_gelu")
    assert not torch.allclose(outputs(default, config)[0], outputs(model, config)[0])


@pytest.mark.parametrize("name, activation", [("openai_clip_tiny", "quick_gelu"), ("open_clip_tiny", "gelu")])
def test_the_peer_goldens_convert_and_match(tmp_path, capsys, name, activation):
    """The peers' own state dicts (tests/fixtures/clip) through the CLI give the peers' outputs within 1e-5."""
    t = load_file(str(GOLDENS / f"{name}.safetensors"))
    meta = json.loads((GOLDENS / f"{name}.json").read_text())
    src = tmp_path / "peer.bin"
    torch.save({k.removeprefix("weights."): v for k, v in t.items() if k.startswith("weights.")}, src)
    assert main(["convert", str(src), "--family", "clip", "--out", str(tmp_path / "o"), "--activation", activation,
                 "--text-heads", str(meta["config"]["transformer_heads"])]) == 0
    model = load_converted(tmp_path / "o").eval()
    assert model.config == CLIPConfig(**meta["config"])
    mean, std = torch.tensor(OPENAI_IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_IMAGE_STD).view(1, 3, 1, 1)
    x = (t["image"] * std + mean) * 2 - 1  # the peer's normalised input back in [-1, 1]
    with torch.no_grad():
        pooled, seq = model.encode_text(t["tokens"], t["lens"])
        got = {"image_features": model.encode_image(x), "text_features": pooled, "text_sequence": seq}
    for key, value in got.items():
        assert float((value - t[key]).abs().max() / t[key].abs().max()) < 1e-5, key


def test_config_from_shapes_follows_build_model(fixtures_dir):
    """The released ViT-L/14 layout (released.json, on the meta device) gives the default config, the extras
    OpenAI's archive holds are dropped, and every key and shape fits."""
    entry = json.loads((fixtures_dir / "released.json").read_text())["karlo/clip-vit-l-14"]
    sd = {k: torch.empty(s, device="meta") for k, s in entry["keys"]}
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    config = clip_config_from_state_dict(sd)
    assert config == CLIPConfig()
    with torch.device("meta"):
        model = CLIP(config)
    assert set(check_clip_state_dict(model, sd)) == {k for k, _ in entry["keys"]}
    assert clip_config_from_state_dict(random_clip().state_dict()) == TINY
    assert clip_config_from_state_dict(sd, activation="gelu").activation == "gelu"


def test_vocab_is_copied(tmp_path, fixtures_dir):
    vocab = fixtures_dir / "tokenizers" / "bpe_simple_vocab_16e6.txt.gz"
    config = dataclasses.replace(TINY, vocab_size=49408, context_length=4, vision_layers=1, transformer_layers=1)
    src = write(CLIP(config), tmp_path / "m.safetensors", "safetensors")
    out = convert_clip(src, tmp_path / "o", vocab=vocab)
    assert (out / "tokenizer" / vocab.name).read_bytes() == vocab.read_bytes()
    small = write(random_clip(), tmp_path / "small.safetensors", "safetensors")
    with pytest.raises(ValueError, match="40 token rows; CLIP's BPE has 49,408"):
        convert_clip(small, tmp_path / "o2", vocab=vocab)
    assert not (tmp_path / "o2").exists()


def test_a_converted_clip_is_no_diffusion_run(tmp_path):
    out = convert_clip(write(random_clip(), tmp_path / "m.pt", "pt"), tmp_path / "o")
    with pytest.raises(ValueError, match="converted CLIP, not a diffusion U-Net.*load_converted"):
        converted_run_config(out)


def _edit(sd: dict, change: str) -> dict:
    sd = dict(sd)
    if change == "missing":
        del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    elif change == "unexpected":
        sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(128)
    elif change == "shape":
        sd["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(200, 64)
    elif change == "resnet":
        sd["visual.layer1.0.conv1.weight"] = torch.zeros(1)
    elif change == "not_vit":
        del sd["visual.conv1.weight"]
    elif change == "extras":
        sd["input_resolution"] = torch.tensor(224)
    elif change == "grid":
        sd["visual.positional_embedding"] = torch.zeros(6, 128)
    return sd


@pytest.mark.parametrize("change, words", [
    ("missing", "missing keys (1): visual.transformer.resblocks.1.mlp.c_fc.bias"),
    ("unexpected", "unexpected keys (1): visual.transformer.resblocks.0.ls_1.gamma; ls_1 / ls_2 are OpenCLIP's"),
    ("shape", "transformer.resblocks.0.mlp.c_fc.weight checkpoint [200, 64] vs model [256, 64]"),
    ("resnet", "a ResNet CLIP"),
    ("not_vit", "not an OpenAI-layout ViT CLIP state dict: missing keys (1): visual.conv1.weight"),
    ("extras", "input_resolution is 224 but its shapes give 16"),
    ("grid", "6 rows, not 1 + a square number"),
])
def test_bad_state_dicts_give_one_clear_line(tmp_path, capsys, change, words):
    src = tmp_path / "bad.pt"
    torch.save(_edit(random_clip().state_dict(), change), src)
    with pytest.raises(ValueError, match="bad.pt") as e:
        convert_clip(src, tmp_path / "o")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert main(["convert", str(src), "--family", "clip", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, words", [
    ("pickle", "argparse.Namespace"),
    ("list", "holds a list, not a state dict"),
    ("garbage", "cannot read CLIP checkpoint"),
    ("safetensors", "cannot read safetensors file"),
    ("torchscript", "cannot read TorchScript archive"),
])
def test_bad_files_give_one_clear_line(tmp_path, capsys, content, words):
    src = tmp_path / ("bad.safetensors" if content == "safetensors" else "bad.pt")
    if content == "pickle":  # an arbitrary class: never unpickled
        torch.save({**random_clip().state_dict(), "args": argparse.Namespace(a=1)}, src)
    elif content == "list":
        torch.save([torch.zeros(1)], src)
    elif content == "torchscript":  # a TorchScript zip whose data is damaged
        write(random_clip(), src, "openai_torchscript")
        import zipfile
        with zipfile.ZipFile(src) as z:
            names = {n: z.read(n) for n in z.namelist()}
        with zipfile.ZipFile(src, "w") as z:
            for n, data in names.items():
                z.writestr(n, b"x" if n.endswith("data.pkl") else data)
    else:
        src.write_bytes(b"not a checkpoint at all")
    assert main(["convert", str(src), "--family", "clip", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error: ") and err.count("\n") == 1 and words in err, err
    assert "weights_only=False" not in err
    assert not (tmp_path / "o").exists()


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    src = write(random_clip(), tmp_path / "m.pt", "pt")
    cases = [
        ([str(src), "--family", "clip", "--preset", "mnist-tiny"], "not allowed with argument"),
        ([str(src)], "one of the arguments --preset --family is required"),
        ([str(src), "--family", "clip", "--activation", "relu"], "invalid choice: 'relu'"),
        ([str(src), "--preset", "mnist-tiny", "--activation", "gelu"], "--activation: only with --family clip"),
        ([str(src), "--family", "clip", "--text-heads", "3"], "transformer_heads"),
        ([str(src), str(src), "--family", "clip"], "converts one checkpoint file; got 2"),
        ([str(tmp_path / "nope.pt"), "--family", "clip"], "checkpoint not found"),
    ]
    for argv, words in cases:
        assert _exit_code(["convert", *argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "o").exists()
