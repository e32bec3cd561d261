"""Training checkpoints that survive crashes and load without unpickling.

A run folder holds one directory per saved step::

    run_dir/ckpt_0001000/
        model.safetensors           network weights
        ema_0.9999.safetensors      one file per EMA rate (a whole network state dict, float32)
        optimizer.pt                optimizer state_dict            (torch.save)
        state.pt                    step, RNG states, data position, timestep-sampler history, ...
        manifest.json               step and every file's size and sha256, written last

A checkpoint is written into a ``.tmp-`` directory beside the final one (each file fsynced), then
renamed into place and the run folder fsynced: a crash at any point leaves the previous
checkpoints intact and at most a ``.tmp-`` directory, which :func:`latest_checkpoint` ignores (and
the next save removes). ``.pt`` files hold only tensors, dicts, lists, tuples, strings and
numbers, so they load with ``torch.load(weights_only=True)``; this is checked when saving.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from difflab.fileio import TEMP_PREFIX, fsync_dir, is_temp_name

CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SAFE_LEAVES = (str, int, float, bool, type(None), Tensor, torch.dtype, torch.Size)


def checkpoint_name(step: int) -> str:
    """``ckpt_0001000`` for step 1000."""
    return f"ckpt_{int(step):07d}"


@dataclass
class TrainingState:
    """Everything a checkpoint holds.

    ``model``: network state dict; ``ema``: {rate: state dict}; ``optimizer``: optimizer
    state_dict; ``extra``: anything else the trainer needs to resume exactly (RNG states from
    :func:`capture_rng_state`, data position, timestep-sampler history, ...), weights-only safe.
    """

    step: int
    model: dict[str, Tensor]
    ema: dict[float, dict[str, Tensor]] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# ============================================================================ RNG state


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training step draws from, as weights-only-safe data.

    Covers torch's CPU and CUDA default generators, numpy's global generator, Python's ``random``
    and the named ``generators`` (the trainer's own, e.g. for timesteps and noise).
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Undo :func:`capture_rng_state`: put every random state back (named generators included)."""
    torch.set_rng_state(state["torch_cpu"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"checkpoint has no state for generator {name!r}; it has {sorted(saved)}")
        g.set_state(saved[name])


# ============================================================================ writing


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not weights-only safe")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {type(obj).__name__} cannot be loaded with weights_only=True; "
        "store tensors, dicts, lists, strings and numbers (e.g. torch.from_numpy for arrays)"
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors with no two sharing memory (safetensors refuses shared storage)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def _write_files(tmp: Path, state: TrainingState) -> None:
    from difflab.train.ema import ema_name

    meta = {"format": "difflab", "step": str(state.step)}
    safetensors.torch.save_file(_plain_tensors(state.model), tmp / "model.safetensors", metadata=meta)
    for rate, sd in state.ema.items():
        safetensors.torch.save_file(
            _plain_tensors(sd), tmp / f"{ema_name(rate)}.safetensors", metadata={**meta, "ema_rate": str(rate)}
        )
    check_weights_only_safe(state.optimizer, "optimizer")
    check_weights_only_safe(state.extra, "extra")
    torch.save(state.optimizer, tmp / "optimizer.pt")
    torch.save({"step": int(state.step), "ema_rates": [float(r) for r in state.ema], "extra": state.extra},
               tmp / "state.pt")
    files = {}
    for p in sorted(tmp.iterdir()):
        _fsync_file(p)
        files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format_version": FORMAT_VERSION, "step": int(state.step), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)


def save_checkpoint(run_dir: str | os.PathLike, state: TrainingState, *, keep_last: int | None = None) -> Path:
    """Write ``state`` to ``run_dir/ckpt_{step:07d}/`` atomically; then keep only the newest
    ``keep_last`` checkpoints (None keeps all). Returns the checkpoint directory.

    Saving a step that already exists replaces it atomically as well. Call on the main rank only.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / checkpoint_name(state.step)
    tmp = run_dir / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, state)
        if final.exists():  # move the old one aside first: a directory cannot be replaced in one step
            old = run_dir / f"{TEMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(run_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and any leftover ``.tmp-`` directories.

    A checkpoint is renamed to a ``.tmp-`` name before it is deleted, so an interrupted delete
    never leaves a partial directory that looks like a checkpoint. Returns the deleted paths.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run_dir = Path(run_dir)
    ckpts = _step_dirs(run_dir)
    removed = []
    for _, path in ckpts[:-keep_last]:
        doomed = run_dir / f"{TEMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    for p in run_dir.iterdir():
        if p.is_dir() and is_temp_name(p.name) and "ckpt_" in p.name:
            shutil.rmtree(p, ignore_errors=True)
    if removed:
        fsync_dir(run_dir)
    return removed


# ============================================================================ finding and reading


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: missing; {ckpt} is incomplete or not a difflab checkpoint")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from None
    for name in ("model.safetensors", "optimizer.pt", "state.pt"):
        if name not in files:
            raise ValueError(f"{path}: lists no {name}")
    return manifest


def verify_checkpoint(ckpt: str | os.PathLike, *, hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest: each file present with its recorded size
    and (``hashes=True``) sha256. Returns the manifest; raises ValueError naming the bad file."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ValueError(f"checkpoint not found: {ckpt}")
    manifest = _read_manifest(ckpt)
    for name, info in manifest["files"].items():
        p = ckpt / name
        if not p.is_file():
            raise ValueError(f"{p}: missing from checkpoint {ckpt.name}")
        if p.stat().st_size != info["bytes"]:
            raise ValueError(f"{p}: corrupt (size {p.stat().st_size} bytes, manifest says {info['bytes']})")
        if hashes and _sha256(p) != info["sha256"]:
            raise ValueError(f"{p}: corrupt (sha256 does not match the manifest)")
    return manifest


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written and corrupt ones left out)."""
    good = []
    for _, path in _step_dirs(Path(run_dir)):
        try:
            verify_checkpoint(path, hashes=False)
        except ValueError:
            continue
        good.append(path)
    return good


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    Temp directories are never candidates; a ``ckpt_*`` directory whose manifest is missing or
    whose files do not match it (size) is skipped with a warning.
    """
    for _, path in reversed(_step_dirs(Path(run_dir))):
        try:
            verify_checkpoint(path, hashes=False)
        except ValueError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
            continue
        return path
    return None


def _load_safetensors(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from None


def _load_pt(path: Path, device: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{path}: corrupt or unsafe checkpoint file ({_short_reason(e)})") from None


def _short_reason(e: Exception) -> str:
    """One line from torch.load's long multi-line refusal: the line that says what was refused
    (never its advice to retry with weights_only=False)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip().removeprefix("WeightsUnpickler error:").strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(boiler)]
    reason = lines[0] if lines else type(e).__name__
    return f"refused by torch.load(weights_only=True): {reason}" if "Weights only" in str(e) else reason


def load_checkpoint(
    ckpt: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> TrainingState:
    """Read a checkpoint directory (or a run folder: its latest checkpoint) into a TrainingState.

    ``verify`` checks every file's sha256 against the manifest first. Raises ValueError naming the
    file for anything missing or corrupt. Never unpickles arbitrary objects.
    """
    ckpt = Path(ckpt)
    if ckpt.is_dir() and not (ckpt / MANIFEST).exists() and _step_dirs(ckpt):
        latest = latest_checkpoint(ckpt)
        if latest is None:
            raise ValueError(f"run folder {ckpt} has no complete checkpoint")
        ckpt = latest
    manifest = verify_checkpoint(ckpt, hashes=verify)
    from difflab.train.ema import ema_name

    meta = _load_pt(ckpt / "state.pt", map_location)
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{ckpt / 'state.pt'}: not a difflab training state")
    ema = {}
    for rate in meta.get("ema_rates", []):
        name = f"{ema_name(rate)}.safetensors"
        if name not in manifest["files"]:
            raise ValueError(f"{ckpt / name}: listed in state.pt but missing from the manifest")
        ema[float(rate)] = _load_safetensors(ckpt / name, map_location)
    return TrainingState(
        step=int(meta["step"]),
        model=_load_safetensors(ckpt / "model.safetensors", map_location),
        ema=ema,
        optimizer=_load_pt(ckpt / "optimizer.pt", map_location),
        extra=meta.get("extra", {}),
    )


def load_weights(ckpt: str | os.PathLike, which: str = "model", *, device: str = "cpu") -> dict[str, Tensor]:
    """One set of weights from a checkpoint directory (or a run folder: its latest checkpoint):
    ``which`` = ``"model"`` or an EMA name such as ``"ema_0.9999"``."""
    ckpt = Path(ckpt)
    if ckpt.is_dir() and not (ckpt / MANIFEST).exists() and _step_dirs(ckpt):
        ckpt = latest_checkpoint(ckpt) or ckpt
    manifest = verify_checkpoint(ckpt, hashes=False)
    name = f"{which}.safetensors"
    if name not in manifest["files"]:
        have = [n.removesuffix(".safetensors") for n in manifest["files"] if n.endswith(".safetensors")]
        raise ValueError(f"checkpoint {ckpt} has no {which!r} weights; it has {', '.join(have)}")
    return _load_safetensors(ckpt / name, device)
