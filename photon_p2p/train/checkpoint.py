"""Atomic, verifiable checkpoints.

Layout of one checkpoint (a directory, so all its files appear at once)::

    <checkpoint-dir>/step-00000120/
        model.safetensors      local model weights          (one .safetensors per tensor group:
        theta.safetensors      swarm: global parameters      model, theta, outer, ...)
        state.pt               optimizer, sampler position, RNG, round: plain containers, loaded weights_only
        meta.json              format, step, config, model shape, and the sha256 + size of every file above

A checkpoint is written into ``.tmp-*`` next to its final place, fsynced, then renamed: a crash mid-write leaves
either the previous checkpoints or a complete new one, never one that loads wrong. Loading re-hashes every file,
so a truncated or edited checkpoint is a one-line error naming the file instead of garbage weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from photon_p2p.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def clear_checkpoints(root: str | Path) -> int:
    """Delete every checkpoint under ``root`` (``--fresh``). Returns how many were removed."""
    ckpts = list_checkpoints(root)
    for p in ckpts:
        try:
            shutil.rmtree(_move_aside(p))
        except OSError as e:
            raise CheckpointError(f"--fresh: cannot delete checkpoint {p} ({e.strerror or e})") from None
    return len(ckpts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share storage (tied embeddings): save one, remember the aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.to("cpu").contiguous()
    return unique, aliases


# .tmp-step-00000120-<pid>-<random> (being written) or .tmp-old-step-00000120-<pid>-<random> (being deleted);
# mkdtemp's random part holds no '-', so the pid is the last number between dashes
_TMP_PID = re.compile(r"^\.tmp-.+-(\d+)-[A-Za-z0-9_]+$")


def _remove_stale_tmp(root: Path) -> None:
    """Remove temporary directories left by writers that died (their pid is gone)."""
    for p in root.glob(_TMP_PREFIX + "*"):
        m = _TMP_PID.match(p.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still alive: someone else's write in progress
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        if pid != os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    text_files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep`` checkpoints.

    ``text_files`` are extra text files (name -> content, e.g. ``tokenizer.json``), hashed and verified like the rest.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--checkpoint-dir {root}: cannot create ({e.strerror})") from None
    _remove_stale_tmp(root)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-{os.getpid()}-", dir=root))
    try:
        files: dict[str, dict[str, Any]] = {}
        aliases: dict[str, dict[str, str]] = {}
        for group, group_tensors in tensors.items():
            unique, group_aliases = _dedupe_shared(group_tensors)
            save_file(unique, str(tmp / f"{group}.safetensors"))
            if group_aliases:
                aliases[group] = group_aliases
        torch.save(state, tmp / "state.pt")
        for name, text in (text_files or {}).items():
            if "/" in name or name in ("meta.json", "state.pt") or name.endswith(".safetensors"):
                raise ValueError(f"save_checkpoint: reserved or nested file name {name!r}")  # a caller bug
            (tmp / name).write_text(text, encoding="utf-8")
        for p in sorted(tmp.iterdir()):
            with p.open("rb") as f:
                os.fsync(f.fileno())
            files[p.name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
        full_meta = dict(meta, format=FORMAT_VERSION, step=step, files=files, aliases=aliases)
        meta_path = tmp / "meta.json"
        with meta_path.open("w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        # re-saving the same step (e.g. resume then immediate stop): move the old one aside first, so a crash in
        # between leaves a complete checkpoint (or none) under the final name, never a half-deleted one
        old = _move_aside(final) if final.exists() else None
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:  # put the previous copy back rather than lose it
                os.rename(old / final.name, final)
            raise
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError, RuntimeError) as e:  # a full or read-only disk: torch.save raises RuntimeError
        detail = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"cannot write checkpoint {final}: {detail}; free some space or choose another --checkpoint-dir"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in list_checkpoints(root)[:-keep]:
        try:
            shutil.rmtree(_move_aside(stale), ignore_errors=True)
        except OSError as e:
            logger.warning("cannot delete old checkpoint %s (%s)", stale, e.strerror or e)
    return final


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint out of the step-* namespace (atomic) before deleting it: a crash mid-delete then leaves
    only a temporary directory that the next save removes, never a half-deleted checkpoint that looks complete."""
    aside = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{path.name}-{os.getpid()}-", dir=path.parent))
    target = aside / path.name
    os.rename(path, target)
    return aside


def read_meta(path: str | Path) -> dict[str, Any]:
    """Parse and sanity-check meta.json of checkpoint ``path`` (cheap: no tensor is read)."""
    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no meta.json: it is incomplete; delete it") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is corrupt ({e}); delete this checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("files"), dict):
        found = meta.get("format") if isinstance(meta, dict) else "?"
        raise CheckpointError(
            f"checkpoint {path}: unknown format {found} (this photon-p2p reads format {FORMAT_VERSION})"
        )
    return meta


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint, checking every file's size and hash first. Tensors are loaded on the CPU."""
    path = Path(path)
    meta = read_meta(path)
    for name, info in meta["files"].items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; delete this checkpoint")
        if p.stat().st_size != info.get("bytes") or (verify and _sha256(p) != info.get("sha256")):
            raise CheckpointError(
                f"checkpoint {path}: {name} is truncated or modified (size/sha256 mismatch); "
                f"delete this checkpoint to resume from the previous one"
            )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for name in meta["files"]:
            if name.endswith(".safetensors"):
                group = name[: -len(".safetensors")]
                loaded = load_file(str(path / name), device="cpu")
                for alias, target in meta.get("aliases", {}).get(group, {}).items():
                    loaded[alias] = loaded[target]
                tensors[group] = loaded
        state = (
            torch.load(path / "state.pt", map_location="cpu", weights_only=True) if "state.pt" in meta["files"] else {}
        )
    except (SafetensorError, RuntimeError, OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e}); delete this checkpoint") from None
    return Checkpoint(path=path, step=int(meta["step"]), meta=meta, tensors=tensors, state=state)


# --------------------------------------------------------------------------------------------------------------
# rebuilding what a checkpoint describes (for export and inspection)


def find_checkpoint(spec: str) -> Path:
    """A step directory as given, or the latest one inside a checkpoint directory."""
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such directory; give a --checkpoint-dir of photon-peer or a step-XXXXXXXX directory inside it"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a directory; give a --checkpoint-dir of photon-peer or a step-XXXXXXXX directory inside it"
        )
    if (path / "meta.json").exists() or re.fullmatch(r"step-\d{8,}", path.name):
        return path  # one checkpoint (load_checkpoint explains what is wrong with an incomplete one)
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path}: holds no checkpoint (no step-XXXXXXXX directory); "
            f"train with photon-peer --checkpoint-dir {path} first"
        )
    return latest


WEIGHT_SOURCES = ("auto", "theta", "local")


def model_from_checkpoint(ckpt: Checkpoint, source: str = "auto"):
    """The model of ``ckpt`` rebuilt from its ``model_args``, on the CPU, in eval mode.

    A swarm checkpoint holds two sets of weights: ``theta`` (the swarm's model, agreed at the last round boundary)
    and ``model`` (this peer's local copy, part-way through a round when the checkpoint was saved on Ctrl-C).
    ``source``: "auto" (theta if the checkpoint has it, else the local weights: a --local-only run has only
    those), "theta" (an error if absent) or "local"."""
    from photon_p2p.model import ModelArgs, Transformer

    if source not in WEIGHT_SOURCES:
        raise ValueError(f"source must be one of {WEIGHT_SOURCES}, not {source!r}")
    try:
        args = ModelArgs.from_dict(ckpt.meta["model_args"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: meta.json has no usable model_args ({e}); it was not written by photon-peer"
        ) from None
    weights = ckpt.tensors.get("model")
    if weights is None:
        raise CheckpointError(f"checkpoint {ckpt.path} has no model.safetensors; it was not written by photon-peer")
    model = Transformer(args)
    theta = ckpt.tensors.get("theta")
    if source == "theta" and theta is None:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds no swarm model (theta): it was saved by a --local-only "
            f"run; use its local weights instead"
        )
    try:
        model.load_state_dict(weights)
        if theta is not None and source != "local":
            params = list(model.parameters())
            if len(theta) != len(params):
                raise RuntimeError(f"theta has {len(theta)} tensors, the model {len(params)} parameters")
            with torch.no_grad():
                for i, p in enumerate(params):
                    t = theta.get(f"{i:05d}")
                    if t is None or t.shape != p.shape:
                        raise RuntimeError(f"theta tensor {i:05d} is missing or has the wrong shape")
                    p.copy_(t)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {ckpt.path}: its weights do not match its model_args ({detail})") from None
    return model.eval()


def tokenizer_from_checkpoint(ckpt: Checkpoint):
    """The tokenizer ``ckpt`` was trained with: its ``tokenizer.json``, or (for checkpoints written before that file
    existed) the built-in byte tokenizer or the --tokenizer file named in its config, if that file is unchanged."""
    from photon_p2p.data.tokenizer import load_tokenizer, tokenizer_from_json
    from photon_p2p.errors import DataError

    expected = ckpt.meta.get("tokenizer")
    if "tokenizer.json" in ckpt.meta.get("files", {}):  # verified against its sha256 by load_checkpoint
        path = ckpt.path / "tokenizer.json"
        try:
            tok = tokenizer_from_json(path.read_text(encoding="utf-8"), origin=str(path))
        except (OSError, UnicodeDecodeError, DataError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path}: tokenizer.json is unusable ({e})") from None
    else:
        spec = ((ckpt.meta.get("config") or {}).get("data") or {}).get("tokenizer", "byte")
        try:
            tok = load_tokenizer(spec)
        except DataError as e:
            raise CheckpointError(
                f"checkpoint {ckpt.path} holds no tokenizer.json and the tokenizer it was trained "
                f"with is unavailable ({e})"
            ) from None
    if expected is not None and tok.fingerprint != expected:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained with tokenizer {expected[:12]}, but "
            f"{getattr(tok, 'name', 'its tokenizer')} is {tok.fingerprint[:12]} (the file changed "
            f"since); use a checkpoint written with tokenizer.json"
        )
    return tok
