"""Training checkpoints: written every N epochs, resumed to the exact weights of an uninterrupted run.

A checkpoint is a folder in the package's model-file container (:mod:`sq_spade._files`):

- ``model-<sha256[:16]>.safetensors``: every tensor of the run, as written by
  :func:`~sq_spade.train.state_for_checkpoint` (``model.*`` parameters and buffers, ``optim.*``
  optimizer moments and step counts, ``rng.*`` states of torch's global CPU (and CUDA) RNG and of
  the loop's generators), plus ``part.*`` (the trained subset of a partly frozen image encoder)
  and ``extra.*`` (best-so-far weights);
- ``config.json`` (class ``"TrainingCheckpoint"``): which trainer wrote it, the number of epochs
  done, whether the run had finished, a fingerprint of the training arguments and data, the
  non-tensor optimizer and scheduler state, and the loop state (history, early stopping, per-expert
  steps...) with exact floats (non-finite values as strings).

Writes survive SIGKILL at any instant (content-addressed tensors file, then the config replaced
atomically, then the old tensors file removed): the folder always holds the previous complete
checkpoint or the new one. Reading uses json and safetensors only, checks the sha256 the config
records, and never unpickles anything.

Format versions: the config's ``checkpoint_version`` names the layout of its entries, one
config class per version in :data:`CHECKPOINT_FORMATS` (version 1: :class:`CheckpointConfigV1`).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from sq_spade._config import JsonConfig, check
from sq_spade._files import (
    CHECKPOINT_CLASS,
    CONFIG_FILE,
    ModelFileError,
    folder_lock,
    load_model_files,
    save_model_files,
)
from sq_spade.train._common import (
    EarlyStopping,
    History,
    load_checkpoint_state,
    state_for_checkpoint,
)
from sq_spade.train._options import FitOptions

Kind = Literal["fit_experts", "fit_contrastive"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(eq=False, kw_only=True)
class CheckpointConfigV1(JsonConfig):
    """Config of a training checkpoint, format 1 (sq_spade 0.1): what the module docstring lists."""

    checkpoint_version: int = field(default=1, metadata=check(lambda v: v == 1))
    kind: Kind
    epoch: int = field(metadata=check(lambda v: v >= 1))
    finished: bool
    fingerprint: dict[str, Any]
    state: dict[str, Any]
    loop: dict[str, Any]


#: Every checkpoint format this version reads, by ``checkpoint_version``.
CHECKPOINT_FORMATS: dict[int, type[CheckpointConfigV1]] = {1: CheckpointConfigV1}
CHECKPOINT_VERSION = 1  # the format new checkpoints are written in
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2, torch.save's zip


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the run resuming from it."""


@dataclass
class Resumed:
    """What :meth:`Checkpointer.attach` restored besides the objects it was given."""

    epoch: int
    """Epochs completed when the checkpoint was written."""
    finished: bool
    """Whether the run had ended (all epochs done, or stopped early)."""
    values: dict[str, Any]
    """Loop values saved by :meth:`Checkpointer.end_epoch` (numpy arrays, numbers, booleans)."""
    tensors: dict[str, Tensor] = field(default_factory=dict)
    """Extra tensors saved by :meth:`Checkpointer.end_epoch` (CPU)."""

    def __post_init__(self) -> None:
        self.values, self.tensors = _Strict(self.values), _Strict(self.tensors)

    def prefixed(self, prefix: str) -> dict[str, Tensor]:
        """The extra tensors whose key starts with ``prefix``, keyed by the rest."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


class _Strict(dict):
    """A dict whose missing keys raise :class:`CheckpointError` (a checkpoint lacking an entry)."""

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(f"`resume`: the checkpoint lacks the entry {key!r} this run needs.")


class Checkpointer:
    """Saves a training loop's state every ``every`` epochs and restores a saved one.

    Built by :meth:`open` from the trainers' ``checkpoint_dir`` / ``checkpoint_every`` /
    ``resume`` arguments; the loop then calls :meth:`attach` once (with the objects to save and
    restore) and :meth:`end_epoch` after every epoch.
    """

    def __init__(self, directory: Path, every: int, kind: str, fingerprint: dict[str, Any],
                 saved: tuple[Path, dict[str, Any], dict[str, Tensor]] | None = None) -> None:
        self.directory, self.every, self.kind = directory, every, kind
        self.fingerprint = fingerprint
        self._saved = saved
        self._objects: dict[str, Any] | None = None

    @classmethod
    def open(cls, options: FitOptions, *, kind: str,
             fingerprint: Callable[[], dict[str, Any]]) -> Checkpointer | None:
        """Load the checkpoint to resume from (if any) and check it fits the run.

        ``options`` carries ``checkpoint_dir``, ``checkpoint_every`` and ``resume`` (checked
        when it was made); this checks the folders. Returns ``None`` when the run neither writes
        nor resumes checkpoints. ``fingerprint`` is called only when checkpoints are used (it
        may hash the data).
        """
        every, resume = options.checkpoint_every, options.resume
        target = None if options.checkpoint_dir is None else Path(options.checkpoint_dir)
        if target is not None and target.exists() and not target.is_dir():
            raise ValueError(f"`checkpoint_dir` must be a folder; {str(target)!r} is a file.")
        source: Path | None = None
        if resume is True:
            # no checkpoint yet (first launch of a job that may be restarted): start fresh
            source = target if (target / CONFIG_FILE).is_file() else None  # type: ignore[operator]
        elif resume is not False:
            source = Path(resume)
            _check_folder(source)
            target = source if target is None else target
        if target is None:
            return None
        # a checkpoint write replaces the folder's config and deletes other tensors files
        held = _held_class(target)
        if held == "?" and source != target:  # (when resuming from it, reading says what is wrong)
            raise ValueError(f"`checkpoint_dir` {str(target)!r} holds a {CONFIG_FILE} that is not "
                             f"a readable sq_spade config; choose another folder or remove it.")
        if held not in (None, "?", CHECKPOINT_CLASS):
            raise ValueError(f"`checkpoint_dir` {str(target)!r} holds a saved {held} model, not a "
                             f"training checkpoint; choose another folder.")
        if resume is False and held is not None:
            warnings.warn(f"`checkpoint_dir` {str(target)!r} holds a checkpoint of an earlier run; "
                          f"this run replaces it (pass resume=True to continue that run instead).",
                          UserWarning, stacklevel=3)
        fp = json.loads(json.dumps(fingerprint()))
        saved = None
        if source is not None:
            config, tensors = read_checkpoint_files(source)
            if config["kind"] != kind:
                raise CheckpointError(f"`resume`: {str(source)!r} holds a {config['kind']} "
                                      f"checkpoint, not a {kind} one.")
            diffs = _differences(config["fingerprint"], fp)
            if diffs:
                raise ValueError(f"`resume`: the checkpoint in {str(source)!r} was written by a run "
                                 f"with other arguments or data: {'; '.join(diffs)}. Resume with "
                                 f"the same arguments and data, or pass resume=False to start over.")
            saved = (source, config, tensors)
        _remove_stale_temporaries(target)
        return cls(target, every, kind, fp, saved)

    def attach(self, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
               scheduler: Any = None, generators: Mapping[str, torch.Generator] | None = None, *,
               history: History, stopper: EarlyStopping,
               partial: Mapping[str, tuple[nn.Module, Sequence[str]]] | None = None,
               ) -> Resumed | None:
        """Register what to save; when resuming, restore it all in place and return the rest.

        ``partial`` maps a name to ``(module, state-dict keys)``: only those entries are saved
        (the trained parameters and the buffers of a partly frozen encoder). torch's global RNG
        (dropout, augmentation) is restored too, so call this last before the epoch loop.
        """
        self._objects = {"modules": dict(modules), "optimizer": optimizer, "scheduler": scheduler,
                         "generators": dict(generators or {}), "partial": dict(partial or {}),
                         "history": history, "stopper": stopper}
        if self._saved is None:
            return None
        source, config, tensors = self._saved
        try:
            load_checkpoint_state({"tensors": tensors, "metadata": config["state"]}, modules,
                                  optimizer, scheduler, generators)
            for name, (module, keys) in (partial or {}).items():
                prefix = f"part.{name}."
                sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if set(sd) != set(keys):
                    raise KeyError(f"the checkpoint's {name!r} entries differ from this run's "
                                   f"trained ones: {sorted(set(sd) ^ set(keys))[:5]}")
                result = module.load_state_dict(sd, strict=False)
                if result.unexpected_keys:
                    raise KeyError(f"unexpected {name!r} entries {result.unexpected_keys[:5]}")
            loop = config["loop"]
            _restore_history(history, loop["history"])
            _restore_stopper(stopper, loop["stopper"])
            values = {k: _decode(v) for k, v in loop["values"].items()}
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"`resume`: the checkpoint in {str(source)!r} does not fit this "
                                  f"run: {e}") from e
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        self._saved = None
        return Resumed(config["epoch"], config["finished"], values, extra)

    def end_epoch(self, epoch: int, finished: bool, *, values: Mapping[str, Any] | None = None,
                  tensors: Mapping[str, Tensor] | None = None) -> bool:
        """After ``epoch`` epochs (1-based count): save when due or ``finished``; return whether saved.

        ``values`` (numbers, booleans, numpy arrays) and ``tensors`` are the loop's own state,
        handed back by :meth:`attach` on resume.
        """
        if not (finished or epoch % self.every == 0):
            return False
        if self._objects is None:
            raise RuntimeError("Checkpointer.attach must be called before end_epoch.")
        o = self._objects
        state = state_for_checkpoint(o["modules"], o["optimizer"], o["scheduler"], o["generators"])
        flat = state["tensors"]
        for name, (module, keys) in o["partial"].items():
            sd = module.state_dict()
            for k in keys:
                flat[f"part.{name}.{k}"] = sd[k].detach().to("cpu", copy=True).contiguous()
        for k, t in (tensors or {}).items():
            flat[f"extra.{k}"] = t.detach().to("cpu", copy=True).contiguous()
        config = {
            "checkpoint_version": CHECKPOINT_VERSION, "kind": self.kind, "epoch": int(epoch),
            "finished": bool(finished), "fingerprint": self.fingerprint, "state": state["metadata"],
            "loop": {"history": _history_state(o["history"]), "stopper": _stopper_state(o["stopper"]),
                     "values": {k: _encode(v) for k, v in (values or {}).items()}},
        }
        save_model_files(self.directory, cls=CHECKPOINT_CLASS, config=config, tensors=flat)
        return True


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a training checkpoint folder (safetensors and JSON only, nothing unpickled).

    Parameters
    ----------
    path
        A folder written by :func:`~sq_spade.train.fit_experts` or
        :func:`~sq_spade.train.fit_contrastive` with ``checkpoint_dir``.

    Returns
    -------
    ``{"kind", "epoch", "finished", "history", "fingerprint", "tensors"}``: the trainer, epochs
    done, whether the run had ended, the history so far (``train_loss``, ``val_loss``, ``lr``
    arrays), the arguments and data digests it was started with, and the names of its tensors.

    Raises
    ------
    CheckpointError
        When the folder is not a readable sq_spade checkpoint (a pickle, a torn or altered file).

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from sq_spade.train import fit_experts
    >>> rng = np.random.default_rng(0)
    >>> f, g = rng.normal(size=(16, 4)).astype("f4"), rng.normal(size=(16, 3)).astype("f4")
    >>> folder = tempfile.mkdtemp()
    >>> _ = fit_experts(f, g, np.zeros(16, int), n_experts=1, epochs=2, batch_size=8, out_dim=4,
    ...                 device="cpu", checkpoint_dir=folder)
    >>> info = read_checkpoint(folder)
    >>> info["kind"], info["epoch"], info["finished"], info["history"]["train_loss"].shape
    ('fit_experts', 2, True, (2, 1))
    """
    path = Path(path)
    _check_folder(path, arg="path")
    config, tensors = read_checkpoint_files(path, arg="path")
    h = History()
    _restore_history(h, config["loop"]["history"])
    hist = h.to_dict()
    return {"kind": config["kind"], "epoch": config["epoch"], "finished": config["finished"],
            "history": {k: hist[k] for k in ("train_loss", "val_loss", "lr")},
            "fingerprint": config["fingerprint"], "tensors": sorted(tensors)}


def read_checkpoint_files(path: Path, arg: str = "resume") -> tuple[CheckpointConfigV1, dict[str, Tensor]]:
    """Validated ``(config, tensors)`` of a checkpoint folder, or :class:`CheckpointError`."""
    try:
        raw, tensors = load_model_files(path, cls=CHECKPOINT_CLASS)
        version = raw.get("checkpoint_version")
        if isinstance(version, int) and version > CHECKPOINT_VERSION:
            raise ModelFileError(f"the checkpoint was written in checkpoint format {version}, newer than this "
                                 f"sq_spade reads ({CHECKPOINT_VERSION}); upgrade sq_spade.")
        config = CHECKPOINT_FORMATS.get(version, CheckpointConfigV1).from_json(raw)
    except (ModelFileError, FileNotFoundError) as e:
        raise CheckpointError(f"`{arg}`: {str(path)!r} is not a readable sq_spade training "
                              f"checkpoint: {e}") from e
    _check_loop_state(config, f"`{arg}`: the checkpoint in {str(path)!r}")
    return config, tensors


def _check_loop_state(config: CheckpointConfigV1, where: str) -> None:
    """:class:`CheckpointError` unless the loop state is whole and agrees with ``epoch``.

    The history must hold one row per epoch done, the early-stopping and loop entries must
    decode, and ``epoch`` may not exceed the run's ``epochs`` (an edited checkpoint would
    otherwise return an unfinished model as finished).
    """
    try:
        loop = config["loop"]
        h = History()
        _restore_history(h, loop["history"])
        _restore_stopper(EarlyStopping(loop["stopper"]["patience"], _decode(loop["stopper"]["min_delta"])),
                         loop["stopper"])
        if not isinstance(loop["values"], dict):
            raise TypeError("`values` is not an object")
        for v in loop["values"].values():
            _decode(v)
        args = config["fingerprint"]["args"]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{where} has a damaged loop state ({type(e).__name__}: {e}); it was "
                              f"not written by sq_spade as it is. Start over with resume=False.") from e
    epochs = args.get("epochs") if isinstance(args, dict) else None
    if isinstance(epochs, int) and config["epoch"] > epochs:
        raise CheckpointError(f"{where} claims {config['epoch']} epochs done, more than the run's "
                              f"`epochs`={epochs}; the checkpoint was edited or damaged.")
    rows = len(h.to_dict()["train_loss"])
    if rows != config["epoch"]:
        raise CheckpointError(f"{where} claims {config['epoch']} epochs done but its history holds "
                              f"{rows}; the checkpoint was edited or damaged.")


# --- fingerprints -----------------------------------------------------------------------------
def fingerprint(args: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the saved one.

    ``args``: training arguments (callables by qualified name). ``data``: arrays (shape, dtype
    and a blake2b digest of their bytes), lengths, strings or ``None``.
    """
    return {"args": {k: _describe_arg(v) for k, v in args.items()},
            "data": {k: _describe_data(v) for k, v in data.items()}}


def digest_tensors(tensors: Mapping[str, Tensor] | Sequence[tuple[str, Tensor]]) -> str:
    """blake2b digest of named tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encoder_fingerprint(encoder: nn.Module, trainable: Sequence[nn.Parameter]) -> dict[str, Any]:
    """Parameter names and shapes, which of them train, and a digest of the frozen ones.

    The trained parameters are left out of the digest: they come from the checkpoint, and an
    encoder object reused after an interrupted run in the same process has changed them.
    """
    ids = {id(p) for p in trainable}
    named = list(encoder.named_parameters())
    return {"parameters": [[n, list(p.shape)] for n, p in named],
            "trained": [n for n, p in named if id(p) in ids],
            "frozen_digest": digest_tensors([(n, p) for n, p in named if id(p) not in ids])}


def trained_state_keys(module: nn.Module, trainable: Sequence[nn.Parameter]) -> list[str]:
    """State-dict keys of a partly trained module that change in training.

    Its trained parameters and all its buffers (batch-norm statistics of the modules in train
    mode); frozen parameters are left out of checkpoints.
    """
    ids = {id(p) for p in trainable}
    params = dict(module.named_parameters(remove_duplicate=False))
    return [k for k in module.state_dict() if k not in params or id(params[k]) in ids]


def _describe_arg(v: Any) -> Any:
    if isinstance(v, (bool, str, type(None))):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return _encode(float(v))
    if isinstance(v, (list, tuple)):
        return [_describe_arg(x) for x in v]
    if callable(v):
        t = v if isinstance(v, type) or hasattr(v, "__qualname__") else type(v)
        return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', repr(t))}"
    return repr(v)


def _describe_data(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str, numbers.Integral)):
        return v
    if isinstance(v, Mapping):
        return dict(v)
    a = np.ascontiguousarray(v)
    h = hashlib.blake2b(digest_size=16)
    h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return {"shape": list(a.shape), "dtype": a.dtype.str, "digest": h.hexdigest()}


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(saved.get("args", {})) | set(current.get("args", {}))):
        s, c = saved.get("args", {}).get(k, "<absent>"), current.get("args", {}).get(k, "<absent>")
        if s != c:
            out.append(f"`{k}`={_decode(c)!r} (checkpoint: {_decode(s)!r})")
    for k in sorted(set(saved.get("data", {})) | set(current.get("data", {}))):
        s, c = saved.get("data", {}).get(k), current.get("data", {}).get(k)
        if s == c:
            continue
        if isinstance(s, dict) and isinstance(c, dict) and "shape" in s and "shape" in c:
            if s["shape"] != c["shape"]:
                out.append(f"`{k}` has shape {tuple(c['shape'])} (checkpoint: {tuple(s['shape'])})")
            else:
                out.append(f"`{k}` holds other values (same shape {tuple(c['shape'])})")
        elif isinstance(s, dict) and isinstance(c, dict):
            keys = sorted(x for x in set(s) | set(c) if s.get(x) != c.get(x))
            out.append(f"`{k}` differs in {keys}")
        else:
            out.append(f"`{k}` is {_short(c)} (checkpoint: {_short(s)})")
    return out


def _short(v: Any) -> str:
    if isinstance(v, dict) and "shape" in v:
        return f"an array of shape {tuple(v['shape'])}"
    return repr(v)


# --- exact JSON for loop state -----------------------------------------------------------------
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode_float(x: float) -> float | str:
    # json writes the shortest repr of a float, which reads back bit for bit; only the
    # non-finite values, which strict JSON lacks, become strings
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _encode(v: Any) -> Any:
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.asarray(v)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"cannot checkpoint an array of dtype {a.dtype}")
        vals = a.ravel().tolist()
        if a.dtype.kind == "f":
            vals = [_encode_float(x) for x in vals]
        return {"__array__": a.dtype.str, "shape": list(a.shape), "values": vals}
    if isinstance(v, float):
        return {"__float__": _encode_float(v)} if not math.isfinite(v) else v
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _encode(x) for k, x in v.items()}
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and "__array__" in v:
        dtype = np.dtype(v["__array__"])
        if dtype.kind not in "biuf":
            raise ValueError(f"unexpected array dtype {dtype}")
        vals = [_NONFINITE[x] if isinstance(x, str) else x for x in v["values"]]
        return np.array(vals, dtype=dtype).reshape(v["shape"])
    if isinstance(v, dict) and "__float__" in v:
        return _NONFINITE[v["__float__"]]
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    return v


def _history_state(h: History) -> dict[str, Any]:
    d = h.to_dict()
    return {"train_loss": _encode(d["train_loss"]), "val_loss": _encode(d["val_loss"]),
            "lr": _encode(d["lr"]), "best_epoch": _encode(np.asarray(h.best_epoch))}


def _restore_history(h: History, state: Mapping[str, Any]) -> None:
    rows = [_decode(state[k]) for k in ("train_loss", "val_loss", "lr")]
    if not (len(rows[0]) == len(rows[1]) == len(rows[2])):
        raise ValueError("history columns of unequal length")
    h.train_loss, h.val_loss, h.lr = [], [], []
    for t, v, lr in zip(*rows, strict=True):
        h.append(t, v, lr)
    best = _decode(state["best_epoch"])
    h.best_epoch = int(best) if best.ndim == 0 else best


def _stopper_state(s: EarlyStopping) -> dict[str, Any]:
    return {"epoch": s.epoch, "best": _encode(s.best), "best_epoch": _encode(s._best_epoch),
            "wait": _encode(s.wait), "patience": s.patience, "min_delta": _encode(s.min_delta)}


def _restore_stopper(s: EarlyStopping, state: Mapping[str, Any]) -> None:
    if state["patience"] != s.patience or _decode(state["min_delta"]) != s.min_delta:
        raise ValueError("early-stopping settings differ")
    s.epoch = int(state["epoch"])
    s.best, s._best_epoch, s.wait = (_decode(state[k]) for k in ("best", "best_epoch", "wait"))


# --- files ---------------------------------------------------------------------------------------
def _check_folder(path: Path, arg: str = "resume") -> None:
    if path.is_dir():
        return
    if not path.exists():
        raise FileNotFoundError(f"`{arg}`: no checkpoint folder at {str(path)!r}.")
    with open(path, "rb") as fh:
        head = fh.read(4)
    hint = (" (it looks like a pickle or torch.save file, which sq_spade never loads: unpickling "
            "runs code)" if head.startswith(_PICKLE_MAGIC) else "")
    raise CheckpointError(f"`{arg}` must be a checkpoint folder written by sq_spade; "
                          f"{str(path)!r} is a file{hint}.")


def _held_class(folder: Path) -> str | None:
    """The ``class`` named by the folder's config (``"?"`` when unreadable), ``None`` if none."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return "?"
    return str(doc.get("class", "?")) if isinstance(doc, dict) else "?"


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary files that a killed writer left (one run per checkpoint folder)."""
    if not folder.is_dir():
        return
    with folder_lock(folder, exclusive=True):  # a writer holds the lock while its temporaries exist
        for pattern in (".model-*.partial", f".{CONFIG_FILE}.*.tmp"):
            for p in folder.glob(pattern):
                p.unlink(missing_ok=True)
