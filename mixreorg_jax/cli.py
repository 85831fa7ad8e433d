"""What every program shares: config-flag parsing with one-line errors, quiet logs, and the
environment its process runs fastest in on a CPU (huge pages for host memory)."""

import logging as pylogging
import os
import pathlib
import platform
from collections.abc import Mapping

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


# glibc's malloc (2.35 and later) asks for transparent huge pages for the memory it maps when
# given this tunable, which it reads once, at process start.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with `HUGE_PAGES_TUNABLE` added to GLIBC_TUNABLES, beside the tunables it sets
    already; an environment that sets glibc.malloc.hugetlb itself is returned as it is.

    XLA:CPU allocates an executable's temporary buffer at every run (1.6 GB for the GroupViT-S
    bf16 train step at batch 16). glibc maps a block that large afresh and unmaps it when it is
    freed, so every step faults all of it in again, 4 KiB at a time: 410,000 page faults and
    0.6 s of kernel time per 1.45 s step on 2 cores. In huge pages it faults in 2 MiB at a time,
    and the step takes 1.05 s (docs/performance.md). Memory is given back as before.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _sets_hugetlb(tunables):
        return dict(environ)
    return dict(environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE))))


def _sets_hugetlb(tunables: str) -> bool:
    return "glibc.malloc.hugetlb=" in tunables


def huge_pages_available() -> bool:
    """Whether `HUGE_PAGES_TUNABLE` takes effect here: Linux, glibc 2.35 or later (older ones
    ignore it), transparent huge pages on `madvise` or `always`."""
    name, version = platform.libc_ver()
    if platform.system() != "Linux" or name != "glibc":
        return False
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
        return False
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def huge_pages_hint() -> str | None:
    """The line to log when this process's malloc could map huge pages and does not (they are
    available and GLIBC_TUNABLES does not set hugetlb); else None."""
    if _sets_hugetlb(os.environ.get("GLIBC_TUNABLES", "")) or not huge_pages_available():
        return None
    return (
        f"host memory in 4 KiB pages: GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} (launch/local.sh sets "
        "it) makes XLA:CPU steps up to 1.4x faster (docs/performance.md)"
    )


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
