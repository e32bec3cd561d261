"""The ``difflab`` command line: parse arguments, then call the library (nothing else lives here).

Each subcommand is a pair: ``_add_NAME(subparsers)`` declares its arguments and sets
``func=_run_NAME``; ``_run_NAME(args) -> int`` calls the library. To add a subcommand, write the
pair and list ``_add_NAME`` in ``_SUBCOMMANDS``. Bad input (ValueError, OSError such as FileNotFoundError) prints
``difflab: error: <message>`` on one line to stderr and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official OpenAI checkpoint (.pt) into a difflab checkpoint folder",
        description="Convert an official improved-diffusion / guided-diffusion / GLIDE / Karlo state dict (--preset), "
        "or an OpenAI / OpenCLIP ViT CLIP (--family clip), into DIR/model.safetensors + DIR/config.yaml, checking "
        "every key and shape.",
    )
    p.add_argument("src", metavar="SRC.pt", nargs="+", help="the official checkpoint (loaded with weights_only=True); "
                   "GLIDE's noised CLIP (--preset glide/clip): its two files, clip/image-enc and clip/text-enc; "
                   "--family clip: a .safetensors, a state dict (.pt / .bin, e.g. open_clip_pytorch_model.bin) or "
                   "OpenAI's released TorchScript archive (ViT-L-14.pt; its tensors only)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", metavar="NAME",
                       help="network preset, e.g. guided-diffusion/256x256_diffusion (see docs/networks.md)")
    which.add_argument("--family", choices=("clip",),
                       help="clip: an OpenAI / OpenCLIP ViT CLIP, its config read off the weights' shapes "
                       "(docs/unclip.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--vocab", metavar="DIR", help="GLIDE U-Nets: the GPT-2 BPE folder (glide-text2im's "
                   "glide_text2im/tokenizer; default: that of an installed glide_text2im), copied into DIR/tokenizer; "
                   "GLIDE's noised CLIP: CLIP's bpe_simple_vocab_16e6.txt.gz or its folder (same default); "
                   "--family clip: the same file, copied if given")
    p.add_argument("--activation", choices=("quick_gelu", "gelu"),
                   help="--family clip: the MLP activation, which the weights cannot tell (default quick_gelu): "
                   "quick_gelu for OpenAI's released CLIPs (and OpenCLIP's 'openai' / *-quickgelu models), gelu for "
                   "OpenCLIP's LAION / DataComp-trained ViTs (e.g. ViT-H-14 laion2b_s32b_b79k)")
    p.add_argument("--vision-heads", type=int, metavar="N", help="--family clip: heads of the image tower "
                   "(default width / 64, OpenAI's rule)")
    p.add_argument("--text-heads", type=int, metavar="N", help="--family clip: heads of the text tower "
                   "(default width / 64, OpenAI's rule)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from difflab.convert import convert_checkpoint, convert_clip

    if args.family == "clip":
        if len(args.src) != 1:
            raise ValueError(f"--family clip converts one checkpoint file; got {len(args.src)}")
        out = convert_clip(args.src[0], args.out, activation=args.activation or "quick_gelu",
                           vision_heads=args.vision_heads, transformer_heads=args.text_heads, vocab=args.vocab)
    else:
        clip_only = [f"--{n.replace('_', '-')}" for n in ("activation", "vision_heads", "text_heads")
                     if getattr(args, n) is not None]
        if clip_only:
            raise ValueError(f"{', '.join(clip_only)}: only with --family clip")
        out = convert_checkpoint(args.src, args.preset, args.out, vocab=args.vocab)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.yaml'}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from difflab.eval.report import add_eval_arguments

    p = sub.add_parser(
        "eval",
        help="FD, precision/recall, IS (and accuracy) of samples against a reference; prints JSON",
        description="Evaluate SAMPLES.npz (arr_0 = uint8 NHWC images, optional arr_1 = labels) against a "
        "reference in difflab's MNIST-classifier features or the FID InceptionV3 (docs/evaluation.md).",
    )
    add_eval_arguments(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from difflab.eval.report import run_eval_command

    return run_eval_command(args)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a diffusion model (or, with 'task: classifier', a noisy classifier) from a YAML config",
        description="Train CONFIG into the run folder --out (config.yaml, metrics.jsonl, ckpt_XXXXXXX/, samples/), "
        "or continue RUN bit-identically with --resume RUN. Under torchrun: DDP over the processes.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (e.g. configs/mnist-default.yaml); "
                   "omit with --resume to use the run's own config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--out", metavar="RUN", help="run folder (default: runs/<config name>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="train until step N (sets train.max_steps)")
    p.add_argument("--max-minutes", type=float, metavar="M", help="stop cleanly (and checkpoint) after M minutes")
    p.add_argument("--max-cpu-minutes", type=float, metavar="M",
                   help="stop cleanly after M minutes of this process's CPU time (all its threads): a budget that "
                   "other work on the machine does not shrink, for equal-compute comparisons")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from difflab.train.distributed import is_main
    from difflab.train.trainer import Trainer, TrainingDiverged, check_limits, resolve_train_config

    cfg, run_dir = resolve_train_config(args.config, args.overrides, out=args.out, resume=args.resume,
                                        max_steps=args.max_steps)
    check_limits(None, args.max_minutes, args.max_cpu_minutes)  # before the run folder is touched
    try:
        trainer = Trainer(cfg, run_dir, resume=args.resume is not None, quiet=args.quiet)
        result = trainer.train(max_minutes=args.max_minutes, max_cpu_minutes=args.max_cpu_minutes)
    except TrainingDiverged as e:
        if is_main():
            print(f"difflab: error: training diverged: {e}; stopped without saving that state "
                  f"(the last good checkpoint in {run_dir} is untouched)", file=sys.stderr)
        return 1
    if is_main():
        if trainer.report is not None:  # a noisy classifier: accuracy per noise level on the held-out split
            from difflab.train.tasks.classifier import format_accuracy

            print(format_accuracy(trainer.report))
        print(f"step {result.step} ({result.stopped}, {result.seconds / 60:.1f} min); run folder: {run_dir}")
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder written by difflab train")
    p.add_argument("--ema", metavar="RATE", help="weights: an EMA rate of the run, or 'model' for the raw weights "
                   "(default: sample.ema_rate, else the first of train.ema_rates)")
    p.add_argument("--checkpoint", metavar="STEP", help="a checkpoint step (default: the latest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _steps_arg(text: str) -> int | str:
    """``--steps``: an int K, or a respacing rule kept as text (checked against T when sampling)."""
    t = text.strip()
    return int(t) if t.lstrip("+-").isdigit() else text


def _add_draw_arguments(p: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --eta, --label, --guidance: how ``difflab sample`` and ``difflab inpaint`` draw."""
    p.add_argument("--sampler", help="ancestral, ddim, ... (difflab.samplers.SAMPLERS; default: sample.sampler)")
    p.add_argument("--steps", type=_steps_arg, metavar="K",
                   help="sampling steps: K, or a respacing rule such as ddim50, 10,10,3 or fast27 "
                   "(default: sample.steps)")
    p.add_argument("--eta", type=float, metavar="E", help="DDIM eta (default: sample.eta)")
    p.add_argument("--label", metavar="L|all", help="class label of every image, or 'all' for labels cycling "
                   "0..K-1 (class-conditional runs or with --classifier; default: all)")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance weight w: "
                   "(1+w) eps(x,y) - w eps(x,null), for runs trained with diffusion.p_uncond > 0 "
                   "(default: sample.guidance_scale)")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    from difflab.eval.report import add_reference_arguments

    p = sub.add_parser(
        "sample",
        help="draw images from a trained run into a PNG grid and/or an .npz",
        description="Draw samples from RUN (config.yaml + latest checkpoint). Writes --grid and/or --npz "
        "(arr_0 uint8 NHWC, arr_1 int64 labels); with neither, RUN/samples/<sampler>_<n>.png and .npz. "
        "With --eval, then prints the samples' metrics as JSON (docs/evaluation.md).",
    )
    _add_run_arguments(p)
    p.add_argument("--n", "--num-samples", dest="n", type=int,
                   help="number of images (default: sample.n); under torchrun spell it --num-samples")
    _add_draw_arguments(p)
    p.add_argument("--classifier", metavar="CLF", help="noisy classifier for classifier guidance: a classifier "
                   "run folder of difflab train or its classifier.safetensors (default: sample.classifier)")
    p.add_argument("--classifier-scale", type=float, metavar="S", help="classifier guidance scale s "
                   "(ADM Alg. 1/2; default: sample.classifier_scale)")
    p.add_argument("--clip", metavar="FOLDER_OR_RUN", help="GLIDE's CLIP guidance towards the --prompt captions: a "
                   "noised CLIP (difflab convert ... --preset glide/clip folder, a task: noised_clip run or its "
                   "noised_clip.safetensors; docs/clip.md)")
    p.add_argument("--clip-scale", type=float, metavar="S", help="CLIP guidance scale s: mu + s Sigma grad "
                   "(z_t . z_i(x_t, t)) (default 1; GLIDE's notebook: 3)")
    p.add_argument("--seed", type=int, help="noise seed (default: sample.seed)")
    p.add_argument("--batch", type=int, metavar="B", help="images per network call (default: sample.batch)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="run the network under "
                   "bf16 autocast, or not (default: sample.bf16, auto = where the hardware has native bf16)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", help="a caption for a "
                   "text-conditional run (repeatable; the samples cycle through them)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a text file of captions, one a line")
    p.add_argument("--grid", metavar="FILE.png", help="write a PNG grid here")
    p.add_argument("--npz", metavar="FILE.npz", help="write the images and labels here")
    p.add_argument("--low-res", metavar="FILE.npz", help="a super-resolution run: the images to upsample (e.g. a "
                   "base run's --npz; --n defaults to their number)")
    p.add_argument("--aug-level", type=int, metavar="S", help="a noise-augmented super-resolution run: the level s "
                   "of its low-res conditioning (CDM; default: sample.aug_level)")
    p.add_argument("--stages", metavar="DIR", help="a cascade file: also write each stage's stage_K.png / .npz here")
    p.add_argument("--eval", action="store_true", help="then evaluate the samples (with their labels) as "
                   "difflab eval does and print its JSON; checked before sampling, sharded under torchrun")
    add_reference_arguments(p.add_argument_group("evaluation (with --eval)"), defaults=False)
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import json

    from difflab.generate import sample_and_evaluate, sample_run
    from difflab.pipelines.cascade import is_cascade_file
    from difflab.pipelines.unclip import is_unclip_file
    from difflab.train.distributed import is_main

    if is_unclip_file(args.run):
        return _run_sample_unclip(args)
    if is_cascade_file(args.run) or (Path(args.run).is_file() and Path(args.run).suffix.lower() in (".yaml", ".yml")):
        return _run_sample_cascade(args)  # a YAML file is read as a cascade, so its own errors are the ones said
    if args.stages is not None:
        raise ValueError("--stages: only for a cascade file (difflab sample CASCADE.yaml)")
    kwargs = dict(n=args.n, sampler=args.sampler, steps=args.steps, eta=args.eta, label=args.label, seed=args.seed,
                  batch=args.batch, guidance_scale=args.guidance, classifier=args.classifier,
                  classifier_scale=args.classifier_scale, bf16=args.bf16, grid=args.grid, npz=args.npz,
                  ema=args.ema, checkpoint=args.checkpoint, low_res=args.low_res, aug_level=args.aug_level,
                  prompts=_prompts(args), progress=not args.quiet, clip=args.clip, clip_scale=args.clip_scale)
    given = [flag for flag, value in (("--ref", args.ref), ("--features", args.features),
                                      ("--inception-weights", args.inception_weights)) if value is not None]
    if not args.eval:
        if given:
            raise ValueError(f"{', '.join(given)}: only used with --eval (evaluate the samples)")
        written, metrics = sample_run(args.run, **kwargs)
    else:
        written, metrics = sample_and_evaluate(args.run, ref=args.ref, features=args.features,
                                               inception_weights=args.inception_weights, **kwargs)
    for path in written:
        print(f"wrote {path}")
    if metrics is not None and is_main():
        print(json.dumps(metrics, indent=2))
    return 0


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt TEXT ... and / or --prompts FILE (one caption a line, blank lines skipped)."""
    prompts = list(args.prompts or [])
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts: file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--prompts {path}: not UTF-8 text") from None
        prompts += [ln.strip() for ln in lines if ln.strip()]
        if not prompts:
            raise ValueError(f"--prompts {path}: no captions in the file")
    return prompts or None


def _run_sample_cascade(args: argparse.Namespace) -> int:
    """``difflab sample CASCADE.yaml``: per-stage settings live in the file (docs/cascade.md)."""
    from difflab.generate import sample_cascade_file

    per_stage = [flag for flag, value in (
        ("--sampler", args.sampler), ("--steps", args.steps), ("--eta", args.eta), ("--guidance", args.guidance),
        ("--classifier", args.classifier), ("--classifier-scale", args.classifier_scale), ("--ema", args.ema),
        ("--checkpoint", args.checkpoint), ("--low-res", args.low_res), ("--aug-level", args.aug_level),
        ("--bf16", args.bf16), ("--eval", args.eval or None), ("--clip", args.clip),
        ("--clip-scale", args.clip_scale)) if value is not None]
    if per_stage:
        raise ValueError(f"{', '.join(per_stage)}: set per stage in the cascade file {args.run} (valid here: --n, "
                         "--seed, --label, --batch, --prompt, --prompts, --grid, --npz, --stages)")
    for path in sample_cascade_file(args.run, n=args.n, seed=args.seed, label=args.label, batch=args.batch,
                                    grid=args.grid, npz=args.npz, stages_dir=args.stages, prompts=_prompts(args),
                                    progress=not args.quiet):
        print(f"wrote {path}")
    return 0


def _run_sample_unclip(args: argparse.Namespace) -> int:
    """``difflab sample UNCLIP.yaml --prompt ...``: prior, decoder and upsamplers (docs/unclip.md)."""
    from difflab.pipelines.unclip import sample_unclip_file

    per_part = [flag for flag, value in (
        ("--sampler", args.sampler), ("--steps", args.steps), ("--eta", args.eta), ("--guidance", args.guidance),
        ("--classifier", args.classifier), ("--classifier-scale", args.classifier_scale), ("--ema", args.ema),
        ("--checkpoint", args.checkpoint), ("--low-res", args.low_res), ("--aug-level", args.aug_level),
        ("--bf16", args.bf16), ("--eval", args.eval or None), ("--clip", args.clip), ("--label", args.label),
        ("--clip-scale", args.clip_scale)) if value is not None]
    if per_part:
        raise ValueError(f"{', '.join(per_part)}: set per part (prior, decoder, upsamplers) in the unCLIP file "
                         f"{args.run} (valid here: --n, --seed, --batch, --prompt, --prompts, --grid, --npz, --stages)")
    prompts = _prompts(args)
    if not prompts:
        raise ValueError("an unCLIP file draws images of captions: give --prompt TEXT (repeatable) or --prompts FILE")
    for path in sample_unclip_file(args.run, prompts, n=args.n, seed=args.seed, batch=args.batch, grid=args.grid,
                                   npz=args.npz, stages_dir=args.stages):
        print(f"wrote {path}")
    return 0


def _add_unclip_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", metavar="UNCLIP.yaml", help="an unCLIP file: prior, decoder (and upsamplers) runs "
                   "(docs/unclip.md)")


def _add_manipulation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_steps_arg, metavar="K", help="DDIM steps of the inversion and the regeneration "
                   "(default: the decoder's)")
    p.add_argument("--guidance", type=float, metavar="W", help="the decoder's classifier-free guidance weight, in the "
                   "inversion and the regeneration (default: the decoder's)")
    p.add_argument("--seed", type=int, help="noise seed (default: the file's)")
    p.add_argument("--out", metavar="FILE.png", help="write a PNG grid here (never overwritten)")
    p.add_argument("--npz", metavar="FILE.npz", help="write the images (uint8 NHWC) here")


def _add_vary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vary", help="image variations with an unCLIP pipeline (DDIM inversion, then eta > 0)",
                       description="Draw --n variations of IMAGE: its CLIP image embedding and its DDIM-inverted "
                       "latent x_T decoded by DDIM with --eta (0 reconstructs the image; unCLIP Sec. 3.1). Writes "
                       "--out and/or --npz; with neither, IMAGE_variations.png and .npz beside it.")
    _add_unclip_arguments(p)
    p.add_argument("image", metavar="IMAGE", help="a PNG at the decoder's size and channels")
    p.add_argument("--n", type=int, default=8, help="number of variations (default 8)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta of the regeneration (default 1; 0 = the image)")
    _add_manipulation_arguments(p)
    p.set_defaults(func=_run_vary)


def _run_vary(args: argparse.Namespace) -> int:
    from difflab.pipelines.unclip import vary_file

    for path in vary_file(args.pipeline, args.image, n=args.n, eta=args.eta, steps=args.steps, seed=args.seed,
                          guidance=args.guidance, grid=args.out, npz=args.npz):
        print(f"wrote {path}")
    return 0


def _add_interpolate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("interpolate", help="interpolate between two images with an unCLIP pipeline (slerp of z_i)",
                       description="Draw --k images from A to B: the CLIP image embeddings slerped, the decoder's "
                       "latent x_T one fixed draw (--latent fixed) or the slerp of the two DDIM inversions (--latent "
                       "slerp; unCLIP Sec. 3.2). Writes --out and/or --npz; with neither, A_to_B.png and .npz.")
    _add_unclip_arguments(p)
    p.add_argument("a", metavar="A", help="the first image (PNG at the decoder's size)")
    p.add_argument("b", metavar="B", help="the last image (same size)")
    p.add_argument("--k", type=int, default=8, help="images including both ends (default 8)")
    p.add_argument("--latent", choices=["fixed", "slerp"], default="fixed", help="x_T: one fixed draw, or the slerp "
                   "of the inversions (default fixed)")
    _add_manipulation_arguments(p)
    p.set_defaults(func=_run_interpolate)


def _run_interpolate(args: argparse.Namespace) -> int:
    from difflab.pipelines.unclip import interpolate_file

    for path in interpolate_file(args.pipeline, args.a, args.b, k=args.k, latent=args.latent, steps=args.steps,
                                 seed=args.seed, guidance=args.guidance, grid=args.out, npz=args.npz):
        print(f"wrote {path}")
    return 0


def _add_inpaint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint",
        help="fill in the black region of a mask on an image with a trained run (GLIDE inpainting)",
        description="Draw N fillings of --image's region that --mask marks black (white = keep, black = fill in; "
        "only 0 and 255; --invert-mask for the opposite) with RUN: an inpainting run (model.inpaint) by GLIDE's "
        "rule, any diffusion run by replacement (docs/inpainting.md). Writes a PNG grid --out and/or --npz; with "
        "neither, RUN/samples/inpaint_<rule>_<n>.png and .npz.",
    )
    _add_run_arguments(p)
    p.add_argument("--image", required=True, metavar="FILE.png", help="the image, at the size of the run's "
                   "samples (RGB for a 3-channel run, grey for a 1-channel one)")
    p.add_argument("--mask", required=True, metavar="FILE.png", help="same size: white (255) = keep, black (0) = "
                   "fill in; any other value is refused (GLIDE's mask, 1 = known)")
    p.add_argument("--invert-mask", action="store_true", help="the mask's white is the region to fill in "
                   "(diffusers' convention)")
    p.add_argument("--rule", choices=["glide", "replace"], help="glide: an inpainting model told the known region, "
                   "x0^ pasted each step; replace: any model, x_t's known region replaced by q(x_t | image) each "
                   "step (default: glide for an inpainting run, else replace)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", help="a caption for a "
                   "text-conditional run (repeatable; the samples cycle through them)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="a text file of captions, one a line")
    p.add_argument("--n", type=int, help="number of fillings (default: the number of prompts, else sample.n)")
    _add_draw_arguments(p)
    p.add_argument("--seed", type=int, help="noise seed (default: sample.seed)")
    p.add_argument("--batch", type=int, metavar="B", help="images per network call (default: sample.batch)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast, or not")
    p.add_argument("--out", metavar="FILE.png", help="write the results as a PNG grid here (never overwritten)")
    p.add_argument("--npz", metavar="FILE.npz", help="write the results (uint8 NHWC) here")
    p.set_defaults(func=_run_inpaint)


def _run_inpaint(args: argparse.Namespace) -> int:
    from difflab.pipelines.inpaint import inpaint_run

    written = inpaint_run(args.run, args.image, args.mask, prompts=_prompts(args), n=args.n, sampler=args.sampler,
                          steps=args.steps, eta=args.eta, label=args.label, seed=args.seed, batch=args.batch,
                          guidance_scale=args.guidance, rule=args.rule, invert_mask=args.invert_mask, out=args.out,
                          npz=args.npz, ema=args.ema, checkpoint=args.checkpoint, bf16=args.bf16,
                          progress=not args.quiet)
    for path in written:
        print(f"wrote {path}")
    return 0


def _add_nll(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nll",
        help="bits/dim (exact VLB: prior + KL terms + decoder) of a run on a data split; prints JSON",
        description="Average calc_bpd_loop over the first N images of the split (built-in data: test by default).",
    )
    _add_run_arguments(p)
    p.add_argument("--split", choices=["train", "test", "all"], help="data split (default: test for MNIST / digits)")
    p.add_argument("--n", "--num-images", dest="n", type=int,
                   help="number of images (default: the whole split); under torchrun spell it --num-images")
    p.add_argument("--steps", type=int, metavar="K", help="bound of the K-step respaced process (default: all T)")
    p.add_argument("--batch", type=int, default=100, metavar="B", help="images per network call (default 100)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.set_defaults(func=_run_nll)


def _run_nll(args: argparse.Namespace) -> int:
    import json

    from difflab.bpd import nll_run

    result = nll_run(args.run, split=args.split, n=args.n, steps=args.steps, batch=args.batch, seed=args.seed,
                     ema=args.ema, checkpoint=args.checkpoint, progress=not args.quiet)
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summary of a run folder: config, parameters, steps, last loss, checkpoints")
    p.add_argument("run", metavar="RUN", help="run folder written by difflab train")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from difflab.runinfo import format_run_info, run_info

    info = run_info(args.run)
    print(json.dumps(info, indent=1) if args.json else format_run_info(info))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check training data: 'difflab data scan PATH' lists every broken image",
                       description="Tools for training data (docs/data.md).")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    scan = data_sub.add_parser(
        "scan", help="decode every image of a folder, manifest or webdataset shards and list the broken ones",
        description="Fully decode every image under PATH (an image folder, a .jsonl manifest, a .tar, a folder of "
        ".tar shards or a brace pattern) and list each file that fails. Exit 0 when all decode, 1 otherwise.")
    scan.add_argument("path", metavar="PATH", help="image folder, manifest .jsonl or webdataset shards")
    scan.add_argument("--captions", action="store_true", help="check the captions too (x.txt sidecars, .txt members)")
    scan.add_argument("--json", action="store_true", help="print JSON")
    scan.set_defaults(func=_run_data_scan)


def _run_data_scan(args: argparse.Namespace) -> int:
    import json

    from difflab.data.scan import scan_images

    report = scan_images(args.path, captions=args.captions)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def _add_gather(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gather", help="write the whole weights of a sharded (train.parallel: fsdp) checkpoint",
                       description="Concatenate the per-rank shards of an FSDP checkpoint into model.safetensors and "
                       "ema_RATE.safetensors beside them (docs/training.md); sampling reads them like any run's.")
    p.add_argument("run", metavar="RUN", help="run folder (its latest checkpoint) or a ckpt_XXXXXXX folder")
    p.add_argument("--checkpoint", metavar="STEP", help="a checkpoint step of RUN (default: the latest)")
    p.set_defaults(func=_run_gather)


def _run_gather(args: argparse.Namespace) -> int:
    from difflab.build import find_checkpoint
    from difflab.train.checkpoint import MANIFEST, gather_checkpoint

    run = args.run
    ckpt = run if (Path(run) / MANIFEST).is_file() else find_checkpoint(run, args.checkpoint)
    for path in gather_checkpoint(ckpt):
        print(path)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web app: sample the named runs / converted folders / cascades in a browser (docs/serve.md)",
        description="Serve a page with progress, previews, a queue and a gallery of results (each with the difflab "
        "command that draws the same pixels) for the MODELs named here and nothing else: run folders, converted "
        "folders, cascade files (.yaml) and noisy-classifier runs (offered as guidance). Needs difflab[serve].",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="a run folder, converted folder, cascade file or "
                   "classifier run (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other prints a warning)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one, printed)")
    p.add_argument("--gallery", default="difflab-gallery", metavar="DIR", help="where results are kept (default "
                   "./difflab-gallery)")
    p.add_argument("--max-n", type=int, default=64, metavar="N", help="most images per job (default 64)")
    p.add_argument("--max-steps", type=int, default=1000, metavar="K", help="most sampling steps (default 1000)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from difflab.serve import serve
    from difflab.serve.models import Limits

    for flag, value in (("--max-n", args.max_n), ("--max-steps", args.max_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    serve(args.models, host=args.host, port=args.port, gallery=args.gallery,
          limits=Limits(max_n=args.max_n, max_steps=args.max_steps))
    return 0


_SUBCOMMANDS = [_add_train, _add_sample, _add_inpaint, _add_vary, _add_interpolate, _add_nll, _add_info, _add_convert,
                _add_eval, _add_data, _add_gather, _add_serve]


class _Parser(argparse.ArgumentParser):
    """argparse with a usage mistake said in one line plus where to look, instead of the usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand (subparsers are of the same class)."""
    parser = _Parser(prog="difflab", description="Pixel-space diffusion models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return "difflab: warning: " + " ".join(str(message).split()) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``difflab``; returns the exit status (2 on bad input)."""
    from difflab.train.distributed import cleanup

    args = build_parser().parse_args(argv)
    saved_format = warnings.formatwarning
    if not args.debug:  # a warning is one line, without the source path and line of the library code
        warnings.formatwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # OSError: a missing file, no permission, a full disk, ...
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line
        print(f"difflab: error: {message}", file=sys.stderr)
        return 2
    finally:
        # Under torchrun every command leaves the process group before the interpreter exits: a gloo
        # group torn down by exit instead can abort ("terminate called without an active exception").
        cleanup()
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    raise SystemExit(main())
