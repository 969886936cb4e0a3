"""Checkpoints: orbax's ``CheckpointManager`` with run metadata and clear errors.

A run directory looks like::

    workdir/
    ├── config.json                 the run's config (written once)
    ├── tokenizer/<file>            a copy of the tokenizer model file
    ├── tokenizer_fingerprint.txt   its fingerprint
    └── checkpoints/
        ├── 200/                    one committed checkpoint per saved step
        │   ├── state/              the TrainState (orbax StandardSave)
        │   ├── data/               data iterator state (JSON)
        │   ├── meta/               run metadata: tokenizer fingerprint, step (JSON)
        │   ├── metrics/            the metrics used to rank "best" (JSON)
        │   └── integrity.json      size and sha256 of every file above
        └── 400.orbax-checkpoint-tmp-1712345678/   an unfinished save
    corrupt_checkpoints/200/        a step that failed its checksums (moved by restore)

Decisions:

* **What is kept.** The last ``max_to_keep`` checkpoints *and* the best one
  by ``best_metric``. Orbax 0.12's ``max_to_keep`` + ``best_fn`` alone keeps
  the best K and would delete the latest if it is not among them, so we pass
  an explicit ``preservation_policy``: ``AnyPreservationPolicy([LatestN(K),
  BestN(1)])`` (a checkpoint survives if either policy keeps it). Checkpoints
  saved without the metric compete only for the "latest" slots.
* **Atomicity.** Orbax writes into ``<step>.orbax-checkpoint-tmp-<time>/`` and
  renames it to ``<step>/`` only once every item is written, so a process
  killed mid-save (even by ``kill -9``) leaves a tmp directory that is never
  listed as a step and never restored; ``cleanup_tmp_directories`` deletes
  it on the next start.
* **When.** ``save`` writes when ``step % save_interval_steps == 0`` (or
  with ``force=True``, or after a preemption notice, orbax's
  ``PreemptionCheckpointingPolicy``). orbax's default initial save, after
  the first step of a fresh run, is left out: a run killed before its first
  interval restarts from step 0 and reproduces the same losses.
* **Async.** Saves are asynchronous by default: device arrays are copied to
  host, then written in a background thread while training continues. The
  next save (or ``wait_until_finished``/``close``) waits for the previous.
  ``async_save=False`` is the same machinery followed by a wait, so both
  modes commit a checkpoint the same way.
* **Integrity.** Every step directory carries ``integrity.json``, the size
  and sha256 of each of its files (``checkpoint_integrity``), written by the
  background thread before the rename that commits the step. ``restore``
  verifies it before reading: a corrupt or truncated checkpoint is logged in
  one sentence (step and reason), moved to ``workdir/corrupt_checkpoints/``
  and the next older intact one is restored instead (the log says so); if
  none is intact, one ``CheckpointCorruptError`` lists every step's reason
  and nothing is moved. A checkpoint without a manifest (an older flaxtune)
  is restored unverified, with a warning; if orbax cannot read it, it counts
  as corrupt too.
* **Restore is sharded.** ``restore(target)`` takes a state whose leaves are
  arrays or ``jax.ShapeDtypeStruct`` s with shardings, and every leaf is read
  straight into its sharding. Before reading, the checkpoint's tree is
  compared with the target's: missing, unexpected or differently shaped
  entries are listed by path in one ``TrainCheckpointMismatchError``.
* **Run files are never overwritten.** A resumed run with a changed config
  keeps ``config.json`` and writes the new one to ``config.1.json`` (2, ...);
  a different tokenizer fingerprint than the one recorded is an error.
* **The tokenizer travels with the model.** The fingerprint recorded at save
  time must equal the manager's at restore time; otherwise the error names
  both.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from flaxtune.data import load_tokenizer
from flaxtune.errors import CheckpointMismatchError, FlaxtuneError, TokenizerMismatchError
from flaxtune.train.checkpoint_integrity import verify_manifest, write_manifest
from flaxtune.train.state import TrainState
from flaxtune.transformer import TransformerConfig
from flaxtune.transformer.scanned_layout import scan_params, to_canonical_layout

PyTree = Any

__all__ = [
    "CheckpointCorruptError",
    "CheckpointManager",
    "TokenizerMismatchError",
    "TrainCheckpointMismatchError",
    "file_fingerprint",
]

logger = logging.getLogger(__name__)

# Where restore moves checkpoints it found corrupt (inside the workdir), so
# that the run can save those steps again and the evidence stays.
CORRUPT_DIR = "corrupt_checkpoints"

_STATE, _DATA, _META = "state", "data", "meta"


class CheckpointCorruptError(FlaxtuneError):
    """No checkpoint of the run can be restored: each one is corrupt or truncated.

    Raised by ``CheckpointManager.restore`` with the reason for every step
    (and for an explicitly requested step that fails its checksums).
    """


class TrainCheckpointMismatchError(CheckpointMismatchError):
    """An orbax checkpoint's ``TrainState`` tree does not fit the state it is restored into.

    Raised before any array is read, listing every missing, unexpected and
    differently shaped entry by path (a different model config, trainability
    rules or optimizer than the checkpoint was written with).
    """


def file_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a tokenizer directory's tokenizer.

    For a directory it is ``sha256:`` + the loaded tokenizer's fingerprint,
    which for our own SentencePiece tokenizer is the digest of its ``.model``
    file: runs that recorded the file's digest keep resuming.
    """
    if os.path.isdir(path):
        return f"sha256:{load_tokenizer(path).fingerprint}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _config_to_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    # Round-trip through JSON so the error (an unserialisable value) is raised
    # here, at construction, and not in a background save.
    try:
        return json.loads(json.dumps(config, default=_json_default))
    except TypeError as e:
        raise TypeError(
            f"The run config is not JSON-serialisable ({e}); keep configs to numbers, "
            "strings, bools, lists and dicts."
        ) from e


def _json_default(x: Any) -> Any:
    if isinstance(x, tuple | set | frozenset):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    return str(key)


def _target_shapes(target: PyTree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _metadata_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    elif tree is None:  # an empty node (e.g. optax's EmptyState)
        return out
    else:
        out[prefix] = tuple(tree.shape)
        return out
    for k, v in items:
        out.update(_metadata_shapes(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _describe_mismatch(saved: dict, wanted: dict, limit: int = 15) -> str | None:
    missing = sorted(wanted.keys() - saved.keys())
    unexpected = sorted(saved.keys() - wanted.keys())
    reshaped = sorted(
        f"{k}: checkpoint {saved[k]} vs model {wanted[k]}"
        for k in saved.keys() & wanted.keys()
        if saved[k] != wanted[k]
    )
    parts = []
    for title, items in (
        ("missing from the checkpoint", missing),
        ("in the checkpoint but not in the model", unexpected),
        ("with different shapes", reshaped),
    ):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(
                f"{len(items)} entries {title}:\n    " + "\n    ".join(items[:limit]) + more
            )
    return "\n  ".join(parts) if parts else None


class CheckpointManager:
    """Saves and restores ``TrainState`` s plus data-iterator state and run metadata.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      save_interval_steps: ``save`` is a no-op unless ``step`` is a multiple
        of it (or ``force=True``).
      max_to_keep: how many of the latest checkpoints to keep.
      best_metric: the ``metrics`` key that ranks checkpoints; ``None`` keeps
        only the latest.
      best_mode: ``"min"`` or ``"max"``.
      async_save: write in a background thread.
      config: the run config (dict, dataclass or ``ConfigDict``) → ``config.json``.
      tokenizer_path: the tokenizer (a file, or a directory written by
        ``Tokenizer.save``), copied into ``workdir/tokenizer/`` unless it is
        that directory already.
      tokenizer_fingerprint: recorded in every checkpoint and checked on
        restore; defaults to the sha256 of ``tokenizer_path``.
      model_config: the ``TransformerConfig`` of the states saved and
        restored. With ``scan_layers`` the state is written in the per-layer
        layout and stacked again when restored
        (``transformer.scanned_layout``), so checkpoints of scanned and
        unscanned runs are interchangeable.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        config: Any = None,
        tokenizer_path: str | os.PathLike | None = None,
        tokenizer_fingerprint: str | None = None,
        model_config: TransformerConfig | None = None,
    ) -> None:
        self._model_config = model_config
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        self.workdir = epath.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.best_metric = best_metric
        if tokenizer_fingerprint is None and tokenizer_path is not None:
            tokenizer_fingerprint = file_fingerprint(tokenizer_path)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        # Several processes share the workdir: process 0 writes the run's files.
        if jax.process_index() == 0:
            self._write_run_files(config, tokenizer_path)

        options = self._manager_options(save_interval_steps, max_to_keep, best_metric, best_mode)
        self._async_save = async_save
        # Steps whose background write is under way, oldest first: orbax
        # finishes saves in the order they were started.
        self._pending: collections.deque[int] = collections.deque()
        self._pending_lock = threading.Lock()
        self._last_saved: int | None = None
        # Handlers are named up front so that a fresh process can read an
        # existing checkpoint's metadata before anything is restored.
        self._manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _DATA: ocp.JsonCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )

    def _manager_options(
        self, save_interval_steps: int, max_to_keep: int, best_metric: str | None, best_mode: str
    ) -> ocp.CheckpointManagerOptions:
        """Keep the last ``max_to_keep`` (and the best); save at the interval and on preemption."""
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # The interval (and preemption) decide alone. orbax's default adds
            # an "initial save" at a fresh run's first call, i.e. after step 1:
            # a checkpoint that nothing needs (a run killed before the first
            # interval restarts from step 0 and reproduces the same losses).
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                [
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            best_fn=best_fn,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Always async: the manifest is written in orbax's post-finalization
            # callback, which only the async checkpointer runs. A synchronous
            # manager waits right after each save instead.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest),
            cleanup_tmp_directories=True,
            create=True,
        )
        return options

    # -- run files -------------------------------------------------------

    def _write_run_files(self, config: Any, tokenizer_path: str | os.PathLike | None) -> None:
        """Writes the run's config and tokenizer; never overwrites what a run wrote before."""
        fingerprint_file = self.workdir / "tokenizer_fingerprint.txt"
        if self.tokenizer_fingerprint is not None and fingerprint_file.exists():
            recorded = fingerprint_file.read_text().strip()
            if recorded != self.tokenizer_fingerprint:
                raise TokenizerMismatchError(
                    f"{self.workdir} was written with tokenizer {recorded}, but this run uses "
                    f"{self.tokenizer_fingerprint}. Use the tokenizer saved in "
                    f"{self.workdir / 'tokenizer'} or start a fresh workdir."
                )
        if config is not None:
            text = json.dumps(_config_to_json(config), indent=2, sort_keys=True)
            path = self.workdir / "config.json"
            if path.exists() and path.read_text() != text:
                # A resumed run with a changed config: keep the original, add the new.
                i = 1
                while (self.workdir / f"config.{i}.json").exists():
                    i += 1
                path = self.workdir / f"config.{i}.json"
                logging.warning(
                    "The config differs from %s/config.json; writing it to %s.", self.workdir, path
                )
            _atomic_write(path, text)
        if tokenizer_path is not None:
            target_dir = self.workdir / "tokenizer"
            if os.path.isdir(tokenizer_path):
                if os.path.realpath(tokenizer_path) != os.path.realpath(target_dir):
                    shutil.copytree(tokenizer_path, os.fspath(target_dir), dirs_exist_ok=True)
            else:
                target_dir.mkdir(exist_ok=True)
                shutil.copyfile(
                    tokenizer_path, os.fspath(target_dir / os.path.basename(tokenizer_path))
                )
        if self.tokenizer_fingerprint is not None:
            _atomic_write(fingerprint_file, self.tokenizer_fingerprint)

    # -- queries ---------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (the latest if there is no metric)."""
        return self._manager.best_step()

    # -- save / restore --------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether ``save`` at ``step`` (without ``force``) would write a checkpoint."""
        return self._manager.should_save(step)

    def save(
        self,
        state: TrainState,
        *,
        data_state: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
        step: int | None = None,
    ) -> bool:
        """Saves ``state`` at ``state.step`` if the interval says so; returns whether it did.

        ``metrics`` must hold ``best_metric`` for the checkpoint to compete
        for "best". Returns immediately with async saving; the arrays are
        already copied, so ``state`` may be donated right after.

        ``step``, when the caller counts steps on the host, lets a step that
        is not saved return without reading ``state.step``: reading it waits
        for the step's computation, which would stop a training loop from
        preparing the next batch while the device works. ``data_state`` may be
        a callable, called only when a checkpoint is written.
        """
        if step is None:
            step = int(jax.device_get(state.step))
        if not force and not self.should_save(step):
            return False
        if step == self._last_saved or step in self.all_steps():
            return False  # already saved (e.g. a forced save right after an interval one)
        state_step = int(jax.device_get(state.step))  # a checkpoint waits for the state anyway
        if step != state_step:
            raise ValueError(f"save(step={step}) but the state is at step {state_step}.")
        if callable(data_state):
            data_state = data_state()
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric is not None and self.best_metric not in metrics:
                raise KeyError(
                    f"save(metrics=...) lacks the best_metric {self.best_metric!r}; "
                    f"got {sorted(metrics)}."
                )
        meta = {"step": step, "tokenizer_fingerprint": self.tokenizer_fingerprint}
        state = self._on_disk(state)
        with self._pending_lock:
            self._pending.append(step)
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardSave(state),
                        _DATA: ocp.args.JsonSave(dict(data_state or {})),
                        _META: ocp.args.JsonSave(meta),
                    }
                ),
                metrics=metrics,
                force=force,
            )
        except BaseException:
            self._forget_pending(step)
            raise
        if not saved:
            self._forget_pending(step)
            return False
        self._last_saved = step
        if not self._async_save:
            self._manager.wait_until_finished()
        return True

    def _forget_pending(self, step: int) -> None:
        with self._pending_lock:
            if self._pending and self._pending[-1] == step:
                self._pending.pop()

    def _write_manifest(self) -> None:
        """orbax's post-finalization callback: the oldest pending step's manifest.

        Runs in the background thread once every item of the step is written,
        while the step still sits in its temporary directory; the rename that
        follows commits the manifest with the arrays.
        """
        with self._pending_lock:
            step = self._pending.popleft()
        candidates = sorted(
            p
            for p in self.directory.iterdir()
            if p.name.startswith(f"{step}.orbax-checkpoint-tmp") and p.is_dir()
        )
        if not candidates:
            raise FileNotFoundError(f"the temporary directory of step {step} is gone")
        write_manifest(os.fspath(candidates[-1]))

    def saved_step(self) -> int | None:
        """The step of the last save this manager started (committed or in flight)."""
        return self._last_saved

    def check_compatible(self, target: TrainState, step: int) -> None:
        """Raises ``TrainCheckpointMismatchError`` if ``step``'s tree does not fit ``target``."""
        saved_tree = self._manager.item_metadata(step)[_STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        if saved_tree is None:
            raise TrainCheckpointMismatchError(
                f"Checkpoint {self.directory / str(step)} has no readable train state; it was "
                "not written by flaxtune's CheckpointManager."
            )
        problem = _describe_mismatch(_metadata_shapes(saved_tree), _target_shapes(target))
        if problem:
            raise TrainCheckpointMismatchError(
                f"Checkpoint {self.directory / str(step)} does not fit the model's train state:\n  "
                f"{problem}\nRestore with the model config, trainability rules and optimizer "
                "the checkpoint was written with, or start a fresh workdir."
            )

    def restore(
        self, target: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores ``(state, data_state)`` from ``step`` (default: the newest intact one).

        Args:
          target: a ``TrainState`` of arrays or ``jax.ShapeDtypeStruct`` s
            carrying shardings; leaves are restored into those shardings.
          step: which checkpoint; ``None`` for the newest one that passes its
            checksums (corrupt newer ones are reported, moved aside and skipped).

        Raises:
          FileNotFoundError: no checkpoint (or not ``step``).
          CheckpointCorruptError: ``step``, or every checkpoint, is corrupt.
          TrainCheckpointMismatchError, TokenizerMismatchError: the checkpoint
            is intact but belongs to another model or tokenizer.
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"No complete checkpoint for step {step} in {self.directory}; "
                    f"available: {steps}."
                )
            restored, problem = self._try_restore(target, step)
            if problem is not None:
                raise CheckpointCorruptError(
                    f"Checkpoint step {step} in {self.directory} is unusable: {problem}."
                )
            return restored
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
        problems: list[tuple[int, str]] = []
        for candidate in sorted(steps, reverse=True):
            restored, problem = self._try_restore(target, candidate)
            if problem is None:
                if problems:
                    self._quarantine([s for s, _ in problems])
                    logger.warning(
                        "Resuming from step %d, the newest intact checkpoint; the corrupt "
                        "ones (steps %s) were moved to %s.",
                        candidate,
                        ", ".join(str(s) for s, _ in problems),
                        self.workdir / CORRUPT_DIR,
                    )
                return restored
            logger.warning("Checkpoint step %d is corrupt: %s.", candidate, problem)
            problems.append((candidate, problem))
        listing = "; ".join(f"step {s}: {p}" for s, p in problems)
        raise CheckpointCorruptError(
            f"No intact checkpoint in {self.directory} ({listing}). Move the checkpoints "
            "directory away to start the run over, or restore it from a backup."
        )

    def _try_restore(
        self, target: TrainState, step: int
    ) -> tuple[tuple[TrainState, dict[str, Any]] | None, str | None]:
        """``(restored, None)``, or ``(None, why the checkpoint is unusable)``.

        Mismatch errors (another model or tokenizer) are raised, not
        returned: the checkpoint is fine, the run is not.
        """
        problem = verify_manifest(self.directory / str(step))
        if problem == "unverified":
            logger.warning(
                "Checkpoint step %d has no integrity manifest (written by an older "
                "flaxtune); restoring it unverified.",
                step,
            )
        elif problem is not None:
            return None, problem
        try:
            return self._restore_step(target, step), None
        except (CheckpointMismatchError, TokenizerMismatchError):
            raise
        except Exception as e:  # any read failure means an unusable checkpoint
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            return None, f"orbax could not read it ({type(e).__name__}: {first_line})"

    def _restore_step(self, target: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        saved_fp = meta[_META].get("tokenizer_fingerprint")
        if (
            self.tokenizer_fingerprint is not None
            and saved_fp is not None
            and saved_fp != self.tokenizer_fingerprint
        ):
            raise TokenizerMismatchError(
                f"Checkpoint step {step} was written with tokenizer {saved_fp}, but this run "
                f"uses {self.tokenizer_fingerprint}. Load the tokenizer saved in "
                f"{self.workdir / 'tokenizer'} or start a fresh workdir."
            )
        abstract = jax.tree.map(_abstract_leaf, target)
        on_disk = self._on_disk(abstract)
        self.check_compatible(on_disk, step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(on_disk), _DATA: ocp.args.JsonRestore()}
            ),
        )
        state = restored[_STATE]
        if self._model_config is not None and self._model_config.scan_layers:
            state = scan_params(state, self._model_config)
            state = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), state, abstract)
        return state, dict(restored[_DATA] or {})

    def _on_disk(self, state: Any) -> Any:
        """``state`` (arrays or abstract leaves) in the per-layer layout checkpoints keep."""
        if self._model_config is None:
            return state
        return to_canonical_layout(state, self._model_config)

    def _quarantine(self, steps: list[int]) -> None:
        """Moves corrupt step directories out of orbax's sight (the run saves those steps anew)."""
        quarantine = self.workdir / CORRUPT_DIR
        quarantine.mkdir(exist_ok=True)
        for step in steps:
            target = quarantine / str(step)
            if target.exists():
                target = quarantine / f"{step}.{time.time_ns()}"
            os.replace(os.fspath(self.directory / str(step)), os.fspath(target))
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _atomic_write(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(path))
