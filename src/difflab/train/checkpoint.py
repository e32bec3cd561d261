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

from difflab.fileio import TEMP_PREFIX, fsync_dir, honour_umask, is_temp_name, new_file_mode
from difflab.safeload import load_weights_only

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


def _write_weights(tmp: Path, state: TrainingState, name, sharded: Mapping[str, list[str]] | None = None) -> None:
    """The weight files: model, one per EMA, the optimizer; ``name(which, ext)`` gives each file's name
    (a sharded checkpoint's names carry the rank), ``sharded`` the names of the sharded tensors."""
    from difflab.train.ema import ema_name

    def meta(which: str, **more: str) -> dict[str, str]:
        out = {"format": "difflab", "step": str(state.step), **more}
        if sharded is not None:
            out["sharded"] = json.dumps(sharded.get(which, []))
        return out

    safetensors.torch.save_file(_plain_tensors(state.model), tmp / name("model", "safetensors"), metadata=meta("model"))
    for rate, sd in state.ema.items():
        which = ema_name(rate)
        safetensors.torch.save_file(_plain_tensors(sd), tmp / name(which, "safetensors"),
                                    metadata=meta(which, ema_rate=str(rate)))
    check_weights_only_safe(state.optimizer, "optimizer")
    torch.save(state.optimizer, tmp / name("optimizer", "pt"))


def _write_state_and_manifest(tmp: Path, state: TrainingState, shards: int = 0) -> None:
    """``state.pt`` and, last, the manifest of every file in ``tmp`` (all fsynced)."""
    check_weights_only_safe(state.extra, "extra")
    torch.save({"step": int(state.step), "ema_rates": [float(r) for r in state.ema], "extra": state.extra},
               tmp / "state.pt")
    files = {}
    mode = new_file_mode()
    for p in sorted(tmp.iterdir()):
        honour_umask(p, mode)  # safetensors writes 0o600 files, whatever the umask
        _fsync_file(p)
        files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format_version": FORMAT_VERSION, "step": int(state.step), "files": files}
    if shards:
        manifest["shards"] = shards
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory onto ``final`` (replacing an old one atomically)."""
    run_dir = final.parent
    if final.exists():  # move the old one aside first: a directory cannot be replaced in one step
        old = run_dir / f"{TEMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(run_dir)


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
    _write_weights(tmp, state, lambda which, ext: f"{which}.{ext}")
    _finish(tmp, final, state, shards=0, keep_last=keep_last)
    return final


def save_sharded_checkpoint(run_dir: str | os.PathLike, state: TrainingState, *, rank: int, world: int,
                            sharded: Mapping[str, list[str]], barrier, keep_last: int | None = None) -> Path:
    """The FSDP form of :func:`save_checkpoint`, called on every rank with that rank's local ``state``
    (:func:`difflab.train.fsdp.local_state`); ``sharded`` names each weight file's sharded tensors.

    Every rank writes ``model / ema_* / optimizer.shard-RRRRR-of-WWWWW.*`` into one temp directory; rank 0
    then writes ``state.pt`` and the manifest (``"shards": W``) and renames the directory into place, so
    a crash of any rank at any point leaves the previous checkpoints intact. ``barrier`` waits for all
    ranks (the run folder must be on a file system every rank sees).
    """
    from difflab.train.fsdp import shard_name

    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(state.step)
    tmp = run_dir / f"{TEMP_PREFIX}{final.name}-sharded"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _write_weights(tmp, state, lambda which, ext: shard_name(which, rank, world, ext), sharded)
    barrier()
    if rank == 0:
        _finish(tmp, final, state, shards=world, keep_last=keep_last)
    barrier()
    return final


def _finish(tmp: Path, final: Path, state: TrainingState, *, shards: int, keep_last: int | None) -> None:
    """``state.pt`` and the manifest into ``tmp`` (whose weight files are written), then rename it onto
    ``final`` and prune; ``tmp`` is removed whatever happens."""
    try:
        _write_state_and_manifest(tmp, state, shards=shards)
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(final.parent, keep_last)


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
    required = ["state.pt"]
    shards = int(manifest.get("shards", 0) or 0)
    if shards:
        from difflab.train.fsdp import shard_name

        required += [shard_name(w, r, shards, ext) for r in range(shards)
                     for w, ext in (("model", "safetensors"), ("optimizer", "pt"))]
    else:
        required += ["model.safetensors", "optimizer.pt"]
    for name in required:
        if name not in files:
            raise ValueError(f"{path}: lists no {name}")
    return manifest


def checkpoint_shards(ckpt: str | os.PathLike) -> int:
    """How many ranks wrote a sharded (FSDP) checkpoint; 0 for a whole one."""
    return int(_read_manifest(Path(ckpt)).get("shards", 0) or 0)


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
    return load_weights_only(path, device, what="checkpoint file")


def load_checkpoint(
    ckpt: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True,
    rank: int | None = None,
) -> TrainingState:
    """Read a checkpoint directory (or a run folder: its latest checkpoint) into a TrainingState.

    ``verify`` checks every file's sha256 against the manifest first. Raises ValueError naming the
    file for anything missing or corrupt. Never unpickles arbitrary objects. A sharded (FSDP)
    checkpoint needs ``rank``: that rank's local state comes back (resume on as many ranks as wrote it).
    """
    ckpt = _resolve_ckpt(ckpt)
    manifest = verify_checkpoint(ckpt, hashes=verify)
    from difflab.train.ema import ema_name

    shards = int(manifest.get("shards", 0) or 0)
    if shards:
        from difflab.train.fsdp import shard_name

        if rank is None or not 0 <= rank < shards:
            raise ValueError(f"{ckpt} is sharded over {shards} ranks (train.parallel: fsdp); resume it on {shards} "
                             f"processes, or gather it first (difflab gather)")

        def name(which: str, ext: str) -> str:
            return shard_name(which, rank, shards, ext)
    else:
        def name(which: str, ext: str) -> str:
            return f"{which}.{ext}"
    meta = _load_pt(ckpt / "state.pt", map_location)
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{ckpt / 'state.pt'}: not a difflab training state")
    ema = {}
    for rate in meta.get("ema_rates", []):
        file = name(ema_name(rate), "safetensors")
        if file not in manifest["files"]:
            raise ValueError(f"{ckpt / file}: listed in state.pt but missing from the manifest")
        ema[float(rate)] = _load_safetensors(ckpt / file, map_location)
    return TrainingState(
        step=int(meta["step"]),
        model=_load_safetensors(ckpt / name("model", "safetensors"), map_location),
        ema=ema,
        optimizer=_load_pt(ckpt / name("optimizer", "pt"), map_location),
        extra=meta.get("extra", {}),
    )


def _resolve_ckpt(ckpt: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run folder's latest complete checkpoint."""
    ckpt = Path(ckpt)
    if ckpt.is_dir() and not (ckpt / MANIFEST).exists() and _step_dirs(ckpt):
        latest = latest_checkpoint(ckpt)
        if latest is None:
            raise ValueError(f"run folder {ckpt} has no complete checkpoint")
        ckpt = latest
    return ckpt


def _gathered(ckpt: Path, manifest: dict[str, Any], which: str, device: str) -> dict[str, Tensor] | None:
    """The whole weights ``which`` of a sharded checkpoint, from its per-rank files (None if absent)."""
    from difflab.train.fsdp import gather_state, shard_name

    shards = int(manifest["shards"])
    names = [shard_name(which, r, shards) for r in range(shards)]
    if any(n not in manifest["files"] for n in names):
        return None
    parts, sharded = [], None
    for n in names:
        parts.append(_load_safetensors(ckpt / n, device))
        if sharded is None:
            with safetensors.safe_open(str(ckpt / n), framework="pt") as f:
                sharded = json.loads((f.metadata() or {}).get("sharded", "[]"))
    return gather_state(parts, sharded or [])


def gather_checkpoint(ckpt: str | os.PathLike) -> list[Path]:
    """Write the whole weights (``model.safetensors``, ``ema_*.safetensors``) of a sharded (FSDP)
    checkpoint beside its shards, and rewrite its manifest to list them (atomically, the manifest
    last): ``difflab sample`` and ``load_weights`` then read one file. Returns the files written."""
    from difflab.fileio import atomic_path

    ckpt = _resolve_ckpt(ckpt)
    manifest = verify_checkpoint(ckpt)
    if not manifest.get("shards"):
        raise ValueError(f"{ckpt} is not sharded: it already holds whole weights")
    meta = _load_pt(ckpt / "state.pt", "cpu")
    from difflab.train.ema import ema_name

    written = []
    for which in ["model", *[ema_name(r) for r in meta.get("ema_rates", [])]]:
        state = _gathered(ckpt, manifest, which, "cpu")
        with atomic_path(ckpt / f"{which}.safetensors") as tmp:
            safetensors.torch.save_file(_plain_tensors(state), tmp, metadata={"format": "difflab",
                                                                               "step": str(manifest["step"])})
        p = ckpt / f"{which}.safetensors"
        manifest["files"][p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        written.append(p)
    with atomic_path(ckpt / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return written


def load_weights(ckpt: str | os.PathLike, which: str = "model", *, device: str = "cpu",
                 verify: bool = True) -> dict[str, Tensor]:
    """One set of weights from a checkpoint directory (or a run folder: its latest checkpoint):
    ``which`` = ``"model"`` or an EMA name such as ``"ema_0.9999"``. A sharded (FSDP) checkpoint is
    gathered from its per-rank files in memory (see :func:`gather_checkpoint` to write one file).
    ``verify``: every file read is checked against the manifest's sha256 first (ValueError naming it),
    so weights that fail their own check are never used."""
    ckpt = Path(ckpt)
    if ckpt.is_dir() and not (ckpt / MANIFEST).exists() and _step_dirs(ckpt):
        ckpt = latest_checkpoint(ckpt) or ckpt
    manifest = verify_checkpoint(ckpt, hashes=False)
    name = f"{which}.safetensors"
    if name not in manifest["files"]:
        if manifest.get("shards"):
            from difflab.train.fsdp import shard_name

            names = [shard_name(which, r, int(manifest["shards"])) for r in range(int(manifest["shards"]))]
            if all(n in manifest["files"] for n in names):
                for n in names if verify else ():
                    _verify_file(ckpt, n, manifest)
                return _gathered(ckpt, manifest, which, device)
        have = sorted({n.split(".shard-")[0].removesuffix(".safetensors") for n in manifest["files"]
                       if n.endswith(".safetensors")})
        raise ValueError(f"checkpoint {ckpt} has no {which!r} weights; it has {', '.join(have)}")
    if verify:
        _verify_file(ckpt, name, manifest)
    return _load_safetensors(ckpt / name, device)


def _verify_file(ckpt: Path, name: str, manifest: dict[str, Any]) -> None:
    """ValueError naming ``ckpt/name`` when its sha256 is not the manifest's."""
    if _sha256(ckpt / name) != manifest["files"][name]["sha256"]:
        raise ValueError(f"{ckpt / name}: corrupt (sha256 does not match the manifest)")
