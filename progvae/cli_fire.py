"""What progvae's command line needs that fire does not give, in one place.

fire turns functions into commands, which is why progvae uses it, but on its own it
- reads a text option that looks like a literal as that literal (`--out=123` arrives as the
  number 123), so text options are quoted before fire sees them;
- accepts a stray positional argument and complains only after the command has run, so
  positionals a command has no place for are refused first, by name;
- reads `--help` as one more `--field=value` of the commands that take any config field, so it
  is moved behind fire's `--` separator, where fire takes it as help;
- checks no numeric flag, so `check_number` does;
- turns an exception into a traceback, so `run` makes a UserError one sentence and exit status
  2, a training stop by signal a line and 128 + the signal, and a closed pipe silence.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import sys
from typing import Callable

import fire

from progvae.core.errors import TrainingInterrupted, UserError


def run(commands: dict[str, Callable], argv: list[str], after_help: Callable[[str], None],
        cleanup: Callable[[], None]) -> None:
    """Run the command `argv` names through fire, with the fixes above. `after_help(command)`
    runs after a command's --help; `cleanup` after every command (e.g. the process group)."""
    fire_argv = help_behind_separator(argv)
    asked_for_help = fire_argv != argv
    try:
        fire_argv = checked_arguments(commands, fire_argv)
        fire.Fire(commands, command=fire_argv, name="progvae")
    except SystemExit as done:
        if asked_for_help and argv and not done.code:
            after_help(argv[0])
        raise
    except UserError as error:
        print(f"progvae: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as stopped:
        print(f"progvae: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signal_number)
    except BrokenPipeError:   # output piped into a reader that stopped (`| head`): no noise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:   # Ctrl-C outside a training loop (loading, evaluating)
        print("progvae: interrupted (Ctrl-C); nothing was left half-written.", file=sys.stderr)
        sys.exit(128 + 2)
    finally:
        cleanup()


def check_number(flag: str, value, minimum: float, integer: bool = False) -> None:
    """A numeric flag of a command (config fields are checked by progvae.core.config): a finite
    number (an integer where `integer`) of at least `minimum`."""
    kinds = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value)
            or value < minimum):
        what = "an integer" if integer else "a finite number"
        raise UserError(f"{flag} must be {what} >= {minimum:g}, got {value!r}.")


def checked_arguments(commands: dict[str, Callable], argv: list[str]) -> list[str]:
    """Refuse, before the command starts, a positional argument it has no place for, and keep
    the value of a text option text."""
    if not argv or argv[0] not in commands:
        return argv
    end = argv.index("--") if "--" in argv else len(argv)
    parameters = inspect.signature(commands[argv[0]]).parameters
    text_options = {name for name, parameter in parameters.items()
                    if parameter.annotation in ("str", str)}
    checked, named, positional = [argv[0]], set(), []
    index = 1
    while index < end:
        token = argv[index]
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token[2:].partition("=")
            name = name.replace("-", "_")
            named.add(name)
            if equals and name in text_options and not reads_as_text(value):
                token = f"--{name}={value!r}"
            checked.append(token)
            if not equals and index + 1 < end and not argv[index + 1].startswith("--"):
                index += 1   # `--flag value`
                checked.append(argv[index])
        else:
            positional.append(token)
            checked.append(token)
        index += 1
    free = [name for name, parameter in parameters.items()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name not in named]
    # A positional may stand for a text option (`evaluate RUN`, which torchrun needs); one that
    # would land on a number or a switch is a stray word, named as such.
    for index, token in enumerate(positional):
        if index >= len(free) or free[index] not in text_options:
            raise UserError(f"Unexpected argument '{token}' for `progvae {argv[0]}`; options "
                            f"are written --name=value (see `progvae {argv[0]} --help`).")
    return checked + argv[end:]


def reads_as_text(value: str) -> bool:
    """Whether fire hands `value` to a command as the string it is (not a number, bool, ...)."""
    try:
        return isinstance(ast.literal_eval(value), str)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return True


def help_behind_separator(argv: list[str]) -> list[str]:
    """`--help` moved behind fire's own `--` separator, where it means help even for a command
    that accepts any flag."""
    flags = argv[:argv.index("--")] if "--" in argv else argv
    if not any(flag in ("--help", "-h") for flag in flags):
        return argv
    kept = [flag for flag in flags if flag not in ("--help", "-h")]
    return kept + ["--", "--help"]
