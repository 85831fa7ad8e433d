"""What every program's command line shares: config-flag parsing with one-line errors, quiet logs."""

import logging as pylogging
import pathlib

from absl import flags, logging

import mixreorg_jax

# Where `configs/...` is looked for when it is not under the working directory: the installed
# package (setup.py ships the repository's configs/ as mixreorg_jax/configs), then the source tree
# (an editable install run from another directory).
_PACKAGE = pathlib.Path(mixreorg_jax.__file__).parent
CONFIG_ROOTS = (_PACKAGE, _PACKAGE.parent)


def resolve_config(spec: str) -> str:
    """`PATH.py[:ARG]` with PATH as given if it exists, else a shipped `configs/...` file.

    A path that exists nowhere is returned unchanged, so the error names what the user typed.
    """
    path, sep, arg = spec.partition(":")
    if not pathlib.Path(path).expanduser().exists() and path.startswith("configs/"):
        for root in CONFIG_ROOTS:
            if (root / path).is_file():
                return str(root / path) + sep + arg
    return spec


def resolve_config_flags(argv: list[str], name: str = "config") -> list[str]:
    """argv with the value of `--NAME=SPEC` / `--NAME SPEC` passed through `resolve_config`."""
    out, value_next = [], False
    for arg in argv:
        if value_next:
            arg, value_next = resolve_config(arg), False
        elif arg in (f"--{name}", f"-{name}"):
            value_next = True
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            flag, _, spec = arg.partition("=")
            arg = f"{flag}={resolve_config(spec)}"
        out.append(arg)
    return out


def quiet_orbax_logs():
    """Orbax logs every file it writes at INFO; keep its warnings, drop the chatter."""

    class _Filter(pylogging.Filter):
        def filter(self, record):
            return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname

    logging.get_absl_handler().addFilter(_Filter())


def one_line(error: Exception, max_details: int = 3) -> str:
    """An error's message on one line: its first line and a few detail lines.

    A traceback quoted inside the message (ml_collections quotes the config file's) is reduced
    to its last line, the exception itself.
    """
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = [lines[0], lines[-1]]
    more = len(lines) - 1 - max_details
    return "; ".join(lines[: 1 + max_details]) + (f"; ... ({more} more)" if more > 0 else "")


def _missing_config_field(error: Exception) -> str | None:
    """The key named by ml_collections' error for a missing field (AttributeError(KeyError))."""
    while isinstance(error, (AttributeError, KeyError)) and error.args:
        if not isinstance(error.args[0], Exception):
            return str(error.args[0])
        error = error.args[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config mistake (an unknown field, a bad value) as one line.

    ml_collections raises a bare AttributeError for a `--config.x.y=...` override of a field the
    config does not have, which absl would show as a traceback.
    """
    argv = resolve_config_flags(argv)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        message = _missing_config_field(e) or str(e)
        key = message.splitlines()[0].strip("'\"")
        culprit = [
            a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")
        ]
        where = culprit[0] if culprit else "a --config override"
        raise SystemExit(
            f"error: {where}: no such config field {one_line(ValueError(message))}"
        ) from None
    except (flags.Error, TypeError, ValueError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None
