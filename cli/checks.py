"""Checks of a user's input, run before any model is loaded: each failure is one line that names
the flag or the file, what is wrong, and the fix (a `UsageError`)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path


class UsageError(ValueError):
    """A mistake in the command line or in a file it names: the message says which, and the fix."""


def check_number(flag: str, value: float | int | None, *, at_least: float | None = None,
                 above: float | None = None, at_most: float | None = None, below: float | None = None) -> None:
    """A finite number within the bounds given (None: the flag was not given, nothing to check)."""
    if value is None:
        return
    bounds = [f"at least {at_least:g}" if at_least is not None else "", f"above {above:g}" if above is not None else "",
              f"at most {at_most:g}" if at_most is not None else "", f"below {below:g}" if below is not None else ""]
    wanted = " and ".join(bound for bound in bounds if bound)
    if not math.isfinite(value):
        raise UsageError(f"{flag} {value} is not a finite number" + (f": give one {wanted}" if wanted else ""))
    if ((at_least is not None and value < at_least) or (above is not None and value <= above)
            or (at_most is not None and value > at_most) or (below is not None and value >= below)):
        raise UsageError(f"{flag} {value} is out of range: give a number {wanted}")


def check_text(flag: str, text: str | None) -> None:
    """Text that is valid UTF-8 (a shell hands Python undecodable bytes as lone surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{flag} is not valid UTF-8 text: pass it in UTF-8 (check the terminal's encoding)") from None


def check_folder(flag: str, path: Path | None, what: str) -> None:
    if path is None:
        return
    if not path.exists():
        raise UsageError(f"{flag} {path} does not exist: give {what}")
    if not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder: give {what}")


def check_writable_file(flag: str, path: Path, overwrite: bool, suffix: str = ".png") -> None:
    """`path` can be written: the right suffix, not a folder, not there already unless
    `overwrite`, and its folder exists or can be created, and takes a file (a probe is created
    and removed in the nearest folder that exists, so nothing is left behind)."""
    if path.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: the file is written as {suffix[1:].upper()}; name it *{suffix}")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file name inside it, e.g. {path / ('image' + suffix)}")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists: pass --overwrite or choose another {flag}")
    check_writable_folder(flag, path.parent)


def check_writable_folder(flag: str, folder: Path) -> None:
    """`folder` exists and takes new files, or can be created (nothing is created here)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag}: {existing} is a file, so {folder} cannot be a folder: choose another path")
    probe = existing / f".accelaes-probe-{uuid.uuid4().hex}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{flag}: cannot write in {existing} ({error.strerror}): choose a folder you can "
                         "write to") from None
