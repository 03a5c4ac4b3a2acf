"""The command line of train.py, `diagnose` and `attention_maps`: a config file with dotted
overrides, and every mistake as one line with an exit code.

    parser = commands.Parser(prog="train.py", description="...")
    commands.add_config_flag(parser, default="configs/default.py")
    def tool(args, overrides): config = commands.config_from_file(args.config, overrides); ...
    commands.exit_with(tool, parser)  # or: code = commands.run(tool, parser, argv)

`run` parses `argv` (the parser's flags and `--config.KEY=VALUE` overrides, each converted to
the type of the value it replaces; a misspelt key is named with the closest spelling), calls
`tool(args, overrides)` and returns the exit code:

- 0: done; `--help` prints the flags and returns 0 too;
- 2: a usage error: a flag, a config key or value, a path given on the command line;
- 1: a failure while running: a damaged checkpoint, a non-finite loss, a file that cannot be
  read or written.

Either error prints one line, "error: ..." naming the flag, key, path or value and what was
expected, instead of a traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import sys
from collections.abc import Callable

import ml_collections

from lru_jax.training import config as config_lib
from lru_jax.training import record, runs
from lru_jax.training.checkpoints import CheckpointError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_USAGE_ERRORS = (config_lib.ConfigError, record.WorkdirError)
# what running may raise for a reason outside the program: named in one line too
_FAILURES = (CheckpointError, ArithmeticError, OSError, ValueError, TypeError)


class UsageError(Exception):
    """A mistake on the command line."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (one line, exit code 2) and no
    abbreviated flags (so `--config.KEY` never reads as an abbreviation)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UsageError(message)


def add_config_flag(parser: Parser, default: str | None, help: str | None = None) -> None:
    parser.add_argument(
        "--config",
        default=default,
        help=help
        or "the config file (a Python file whose get_config() returns the config); override "
        "its keys with --config.KEY=VALUE, e.g. --config.model.d_model=64",
    )


def run(tool: Callable, parser: Parser, argv=None, *, overrides: bool = True) -> int:
    """Calls `tool(args, overrides)` on the parsed `argv` (default: sys.argv[1:]); returns
    the exit code. `overrides`: whether the tool takes --config.KEY=VALUE arguments."""
    try:
        args, rest = parser.parse_known_args(argv)
        pairs = split_overrides(rest)
        if pairs and not overrides:
            raise UsageError(f"unexpected arguments: {' '.join(rest)}")
        tool(args, pairs)
    except SystemExit as done:  # argparse's --help
        return done.code if isinstance(done.code, int) else EXIT_OK
    except (UsageError, *_USAGE_ERRORS) as err:
        return _report(err, EXIT_USAGE)
    except _FAILURES as err:
        return _report(err, EXIT_FAILURE)
    return EXIT_OK


def exit_with(tool: Callable, parser: Parser, **kwargs):
    """`run` on sys.argv, then exits with its code (a tool's `if __name__ == "__main__"`)."""
    code = run(tool, parser, **kwargs)
    if code != EXIT_OK:
        _hide_closed_event_loop_noise()
    sys.exit(code)


def _report(err: Exception, code: int) -> int:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None:  # e.g. "[Errno 2] ...: 'path'"
        text = f"{err.filename}: {err.strerror}"
    print(f"error: {text}", file=sys.stderr)
    return code


def _hide_closed_event_loop_noise() -> None:
    """A failed orbax read can leave coroutines that, collected as the interpreter exits,
    print "Exception ignored ... RuntimeError: Event loop is closed": after the one-line
    error they would be what the user reads last. They say nothing, so they are dropped."""
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and "Event loop is closed" in str(value)):
            previous(unraisable)

    sys.unraisablehook = hook


# ------------------------------------------------------------------ config overrides


def split_overrides(arguments: list[str]) -> list[tuple[str, str]]:
    """[("model.d_model", "64"), ...] from "--config.model.d_model=64" (or "... 64")
    arguments; anything else is a UsageError."""
    pairs, rest = [], list(arguments)
    while rest:
        argument = rest.pop(0)
        if not argument.startswith("--config."):
            raise UsageError(f"unexpected argument {argument!r} (see --help)")
        key, sep, text = argument[len("--config.") :].partition("=")
        if not sep:
            if not rest or rest[0].startswith("--"):
                raise UsageError(f"{argument}: expected a value, as {argument}=VALUE")
            text = rest.pop(0)
        pairs.append((key, text))
    return pairs


def config_from_file(path: str | None, pairs) -> ml_collections.ConfigDict:
    """The locked config of the config file at `path` with the overrides `pairs` applied."""
    if path is None:
        raise UsageError("--config: expected a config file, got none")
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "no such file"
        raise UsageError(f"--config: expected a config file (a .py file), got {path!r} ({what})")
    try:
        config = config_lib.load_config(path)
    except Exception as err:  # the file's own error: a syntax error, no get_config, ...
        raise UsageError(f"--config: {path!r} did not load: {type(err).__name__}: {err}") from None
    apply_overrides(config, pairs)
    return config


def apply_overrides(config: ml_collections.ConfigDict, pairs) -> None:
    """Sets each (dotted key, text) of `pairs`, the text read as the type of the value it
    replaces; an unknown key, a group or a text of the wrong type is a UsageError."""
    for key, text in pairs:
        group, name = _locate(config, key)
        group[name] = _convert(f"--config.{key}", text, group[name])


def _locate(config, key: str):
    """(the ConfigDict holding `key`'s last part, that part), or a UsageError naming the key
    with the closest existing spelling."""
    flag = f"--config.{key}"
    parts = key.split(".")
    if parts[0] == "model" and len(parts) == 2 and parts[1] in config_lib.MOVED_MODEL_KEYS:
        old = config.model.get(parts[1])
        if not isinstance(old, (str, int, float, bool)):  # not a key of today's layout
            raise UsageError(
                f"{flag}: renamed --config.model.{config_lib.MOVED_MODEL_KEYS[parts[1]]}"
            )
    group = config
    for depth, part in enumerate(parts):
        if part not in group:
            known = list(group.keys())
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(["config", *parts[:depth]])
            if close:
                hint = f"did you mean --{'.'.join([where, *close])}?"
            else:
                hint = f"{where} has {', '.join(known)}"
            raise UsageError(f"{flag}: no such key ({hint})")
        if depth < len(parts) - 1:
            group = group[part]
            if not isinstance(group, ml_collections.ConfigDict):
                raise UsageError(f"{flag}: no such key ({'.'.join(parts[: depth + 1])} is a value)")
    if isinstance(group[parts[-1]], ml_collections.ConfigDict):
        raise UsageError(f"{flag}: a group of keys, not a value (set {flag}.KEY=VALUE)")
    return group, parts[-1]


def _convert(flag: str, text: str, current):
    """`text` as the type of `current` (bool, int, float, str; else a Python literal)."""
    if isinstance(current, bool):
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() not in words:
            raise UsageError(f"{flag}: expected true or false, got {text!r}")
        return words[text.lower()]
    for kind, expected in ((int, "an int"), (float, "a number")):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise UsageError(f"{flag}: expected {expected}, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:  # None, tuples, lists: a literal, or else the text itself
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# ------------------------------------------------------------------ a trained run's config


def run_config(path: str | None, workdir: str | None, pairs) -> ml_collections.ConfigDict:
    """The config of a tool that reads a model: the run's own (workdir/config.json, with the
    overrides `pairs`, which may not change the model) when `workdir` is given, else the
    config file's."""
    if workdir is None:
        if path is None:
            raise UsageError("--config: expected a config file, or --workdir of a trained run")
        return config_from_file(path, pairs)
    if path is not None:
        raise UsageError(
            "--config: not with --workdir, whose config.json is the run's (change its keys "
            "with --config.KEY=VALUE)"
        )
    saved = runs.read_config(workdir)
    config = ml_collections.ConfigDict(saved.to_dict())
    apply_overrides(config, pairs)
    changes = record.differences(record.flat(saved), record.flat(config))
    reason = f"the checkpoint in {workdir} holds the run's model (leave model keys as they were)"
    record.refuse_fixed_changes(changes, ("model",), reason)
    return config
