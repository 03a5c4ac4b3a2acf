"""Checkpoints with orbax-checkpoint's CheckpointManager, each one verified by a checksum
manifest.

A save is orbax's (synchronous and atomic: orbax writes to a temporary directory and renames it
when complete), then `<step>/checksums.json`: the size and sha256 of every file of the step,
written to a temporary file and renamed into place, so it exists only once complete. A step
folder without it (a save killed between the two, an empty or stray folder) is incomplete.

`Checkpointer.latest_step` is the newest step whose files all match their manifest. A damaged
or incomplete step is renamed `<step>.damaged` (kept for a look, never loaded: orbax does not
list it) with a one-line warning, and the step before it is tried; with `on_damaged="stop"`
a `CheckpointError` names what is wrong instead. A restore first compares the stored arrays'
shapes and dtypes with the template's, so a checkpoint of another model is refused naming the
arrays that differ, before orbax reads anything; any other failure of the storage layer is one
`CheckpointError` line too. A TrainState saved before `model_state` existed (BatchNorm's
averages in a top-level `batch_stats`) restores through `state.legacy_layout`. A directory in
which no step has a manifest (saved before lru_jax wrote them) restores unverified, with a note.

Sharding-aware: every process takes part in a save, each writing the shards it holds, and a
restore lays each array out as the template's sharding says, so a state saved on one mesh
restores onto another (e.g. saved on 4 devices, restored on 1 or 2). Process 0 alone writes
manifests and sets damaged steps aside; every process reaches the same verdict from the files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from lru_jax import _checks
from lru_jax.training import state as state_lib
from lru_jax.training.state import TrainState

MANIFEST = "checksums.json"
ON_DAMAGED = ("fallback", "stop")
_ORBAX_METADATA = "_CHECKPOINT_METADATA"  # orbax writes it into every finished step folder


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, of another model, unreadable."""


def file_checksums(folder: str) -> dict[str, dict]:
    """{path relative to `folder`: {"bytes": size, "sha256": hex digest}} of every file in it
    (the manifest itself aside)."""
    sums = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, folder)
            if relative != MANIFEST:
                sums[relative] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    return dict(sorted(sums.items()))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str) -> None:
    """Writes `folder`/checksums.json atomically: a temporary file, flushed, then renamed."""
    manifest = {"format": 1, "files": file_checksums(folder)}
    temporary = os.path.join(folder, MANIFEST + ".tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, MANIFEST))


def problem(folder: str) -> str | None:
    """What is wrong with the step saved in `folder` by its manifest, or None if every file is
    there with its recorded size and checksum."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return f"incomplete: no {MANIFEST} (the save did not finish)"
    try:
        with open(path) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for relative, expected in recorded.items():
        file = os.path.join(folder, relative)
        try:
            if not os.path.isfile(file):
                return f"{relative} is missing"
            size = os.path.getsize(file)
            if size != expected["bytes"]:
                return f"{relative} has {size} bytes, {expected['bytes']} were saved"
            if _sha256(file) != expected["sha256"]:
                return f"{relative} does not match its checksum (overwritten)"
        except OSError as err:  # e.g. set aside by process 0 while this one reads
            return f"{relative} is unreadable ({err.strerror})"
    return None


def _legacy_problem(folder: str) -> str | None:
    """For runs saved before manifests: only whether orbax finished the step."""
    if not os.path.exists(os.path.join(folder, _ORBAX_METADATA)):
        return f"incomplete: no {_ORBAX_METADATA}"
    return None


class Checkpointer:
    """Periodic saves into `directory`, keeping the newest `keep` (0 keeps all).

    on_damaged: "fallback" (set a damaged step aside and use the one before) or "stop" (raise
    `CheckpointError`). `writes`: whether this process writes manifests and renames damaged
    steps (process 0 of several; every process verifies).
    """

    def __init__(self, directory: str, keep: int, on_damaged: str = "fallback", writes=True):
        _checks.one_of("on_damaged", on_damaged, ON_DAMAGED)
        self.directory = os.path.abspath(directory)
        self.on_damaged = on_damaged
        self.writes = writes
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=False, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def _folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        """The newest step that verifies (after setting aside newer damaged ones), or None."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        verified = any(os.path.exists(os.path.join(self._folder(s), MANIFEST)) for s in steps)
        check = problem if verified else _legacy_problem
        found, set_aside = None, False
        for step in steps:
            wrong = check(self._folder(step))
            if wrong is None:
                found = step
                break
            self._set_aside(step, wrong)
            set_aside = True
        if set_aside:
            _sync_processes("lru_jax checkpoints set aside")
            self.manager.reload()
            if found is None:
                message = f"warning: no checkpoint in {self.directory} verifies; starting afresh"
                print(message, file=sys.stderr)
        if found is not None and not verified:
            print(
                f"note: no checkpoint in {self.directory} has a {MANIFEST} (saved before "
                f"lru_jax wrote them); restoring step {found} unverified",
                file=sys.stderr,
            )
        return found

    def _set_aside(self, step: int, wrong: str) -> None:
        where = f"checkpoint: step {step} in {self.directory}"
        if self.on_damaged == "stop":
            raise CheckpointError(
                f"{where} is damaged ({wrong}); stopped, as train.on_damaged_checkpoint='stop' "
                f"says (move {step}/ away or set it to 'fallback' to resume from the step before)"
            )
        done = "skipped"
        if self.writes:
            target = _free_name(self._folder(step) + ".damaged")
            os.rename(self._folder(step), target)
            done = f"kept as {os.path.basename(target)}"
        print(
            f"warning: {where} is damaged ({wrong}); {done}, trying the step before",
            file=sys.stderr,
        )

    def save(self, step: int, state) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()
        if self.writes:
            write_manifest(self._folder(step))

    def restore(self, template, step: int | None = None):
        """The state saved at `step` (default: `latest_step()`), shaped and sharded like
        `template` (a pytree of jax.Arrays or of jax.ShapeDtypeStructs with shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"checkpoint: none that verifies in {self.directory}")
        target = jax.tree.map(_abstract, template)
        if isinstance(template, TrainState) and self._saved_before_model_state(step):
            extra = sorted(set(template.model_state) - {state_lib.LEGACY_FIELD})
            if extra:
                raise CheckpointError(
                    f"checkpoint: step {step} in {self.directory} was saved before models kept "
                    f"state {', '.join(extra)}; it cannot continue this model"
                )
            saved = self._restore(step, state_lib.legacy_layout(target))
            return state_lib.from_legacy_layout(template, saved)
        return self._restore(step, target)

    def _saved_before_model_state(self, step: int) -> bool:
        """Whether step's checkpoint has the TrainState layout of before `model_state`."""
        try:
            saved = set(self.manager.item_metadata(step).keys())
        except Exception:  # unreadable metadata: _check_fits names it
            return False
        return state_lib.LEGACY_FIELD in saved and "model_state" not in saved

    def _restore(self, step: int, target):
        self._check_fits(step, target)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:  # tensorstore and orbax raise many kinds, with long dumps
            failure = f"checkpoint: step {step} in {self.directory} could not be read: "
            failure += _first_line(err)
        _collect_quietly()  # the storage layer's abandoned reads, before the event loop is gone
        raise CheckpointError(failure)

    def _check_fits(self, step: int, target) -> None:
        """A CheckpointError naming the arrays whose stored shape or dtype differs from the
        target's (or that only one of them has)."""
        where = f"checkpoint: step {step} in {self.directory}"
        try:
            stored = _shapes(self.manager.item_metadata(step))
        except Exception as err:
            failure = f"{where}: its metadata is unreadable: {_first_line(err)}"
            raise CheckpointError(failure) from None
        wanted = _shapes(target)
        differences = [
            f"{name} {_describe(stored.get(name))} saved, {_describe(wanted.get(name))} built"
            for name in sorted(set(stored) | set(wanted), key=_parameters_first)
            if stored.get(name) != wanted.get(name)
        ]
        if differences:
            shown = "; ".join(differences[:3])
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise CheckpointError(
                f"{where} does not fit the model and optimiser this config builds: {shown}{more}"
            )

    def close(self) -> None:
        self.manager.close()


def _shapes(tree) -> dict[str, tuple]:
    """{"params/blocks_0/mixer/B_re": (shape, dtype name)} of every array leaf of `tree`."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (
            tuple(leaf.shape),
            np.dtype(leaf.dtype).name,
        )
        for path, leaf in leaves
    }


def _parameters_first(name: str):
    """Sort key: the parameters' names, which say what differs, before the optimiser's."""
    return (name.startswith("opt_state"), name)


def _describe(shape_dtype) -> str:
    if shape_dtype is None:
        return "none"
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _free_name(path: str) -> str:
    """`path`, or `path`.2, .3, ... if taken (a step damaged twice keeps both)."""
    candidate, index = path, 1
    while os.path.exists(candidate):
        index += 1
        candidate = f"{path}.{index}"
    return candidate


def _collect_quietly() -> None:
    """Collects the coroutines a failed orbax read leaves behind, now, without the
    "Event loop is closed" tracebacks they print when collected later."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _sync_processes(name: str) -> None:
    """Waits for every process (process 0 renames, the others must not list the steps first)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _abstract(leaf):
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf
