"""A run's record in its workdir: `config.json` (the config in effect) and
`config_history.jsonl` (every config the run has trained with, from the step it took effect),
and the check that a resumed run's config may continue the run.

On resume the new config is compared key by key with the run's config.json. A change to the
model, the data (the task, the seed) or the optimiser's kind is refused with the keys named:
the checkpoint would not fit, or the run would go on as another experiment. Any other change
(learning rate, number of steps, logging, sharding, ...) is accepted, printed, and recorded:
config.json is rewritten and config_history.jsonl gets the line

    {"step": s, "changed": {"train.learning_rate": [0.003, 0.001]}, "config": {...}}

so the config of any step is the one on the last line at or before it (a fresh run writes
the first line, at step 0, with nothing changed).
"""

from __future__ import annotations

import json
import os
import tempfile

from lru_jax.training import config as config_lib

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
# what a resumed run may not change: the model, the data, the optimiser state's kind
FIXED = ("seed", "task", "model", "train.optimizer")


class WorkdirError(ValueError):
    """A workdir that is not a directory or cannot be written."""


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` if needed and checks that files can be written in it."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as err:
        kind = "a file" if os.path.isfile(workdir) else err.strerror
        raise WorkdirError(
            f"workdir: expected a directory that can be written, got {workdir!r} ({kind})"
        ) from None


def flat(config) -> dict:
    """{"model.lru.d_state": 64, ...}: every key of a config (ConfigDict or dict) as it reads
    back from JSON, so a saved config and a live one compare equal."""
    if not isinstance(config, dict):
        config = json.loads(config.to_json_best_effort())
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[key] = value
    return out


def differences(before: dict, after: dict) -> dict[str, list]:
    """{key: [old, new]} of the flat configs' keys whose values differ (None where absent)."""
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}


def is_fixed(key: str, fixed=FIXED) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fixed)


def describe(changes: dict[str, list]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def saved_config(workdir: str) -> dict | None:
    """The flat config of the run in `workdir` (its config.json, in today's layout; keys
    added to the config since, outside the task, at their defaults), or None."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = flat(config_lib.upgrade(json.load(f)))
    defaults = flat(config_lib.default_config())
    return {**{k: v for k, v in defaults.items() if not is_fixed(k, ("task",))}, **saved}


def refuse_fixed_changes(changes: dict, fixed, reason: str) -> None:
    """A ConfigError naming the keys of `changes` that `fixed` covers, and why."""
    refused = {k: v for k, v in changes.items() if is_fixed(k, fixed)}
    if refused:
        raise config_lib.ConfigError(f"config: {describe(refused)}: {reason}")


def check_resume(workdir: str, config, step: int) -> dict[str, list]:
    """The changes of `config` from the run's config.json that a resume from `step` accepts
    ({} if the run has no config.json); a ConfigError for the ones it refuses."""
    saved = saved_config(workdir)
    if saved is None:
        return {}
    changes = differences(saved, flat(config))
    refuse_fixed_changes(
        changes,
        FIXED,
        f"the run in {workdir} continues from its checkpoint at step {step} with the model, "
        "data (task, seed) and optimiser it started with (use a fresh --workdir, or the "
        "run's own values)",
    )
    return changes


def write(workdir: str, config, step: int, changes: dict | None) -> None:
    """Records the config a run trains with from `step`: a fresh run (`changes` None) starts
    config.json and the history; a resume records accepted `changes`, if any."""
    config_path = os.path.join(workdir, CONFIG_FILE)
    history_path = os.path.join(workdir, HISTORY_FILE)
    fresh = changes is None or not os.path.exists(config_path)
    if not fresh and not changes:
        return
    with open(config_path, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    line = {
        "step": step,
        "changed": changes or {},
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(history_path, "w" if changes is None else "a") as f:
        f.write(json.dumps(line) + "\n")
    if changes:
        print(f"resuming with {describe(changes)} (recorded in {HISTORY_FILE})")
