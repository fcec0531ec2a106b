"""Where flowtile may write: checks made before any work starts, so a bad path costs the user nothing.

The rule (docs/architecture.md, "Program format"): a command writes only the paths it was given, replaces an
existing file only where a file was asked for, and replaces an existing directory only if it is a flowtile program
directory (``program.json`` and ``arrays.npz``, nothing else). Everything is written with the user's umask.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OutputPathError", "check_output_file", "check_distinct", "check_parent_writable"]


class OutputPathError(ValueError):
    """An output path that flowtile refuses to write (it would destroy something that is not its own output)."""


def _nearest_existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    return parent


def check_parent_writable(path: Path, option: str) -> None:
    """The directory that will hold ``path`` exists or can be made, and is writable."""
    for ancestor in [*reversed(path.parents)]:
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputPathError(f"{option} '{path}': '{ancestor}' is a file, not a directory")
    parent = _nearest_existing_parent(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} '{path}': directory '{parent}' is not writable")


def check_output_file(path: str | os.PathLike | None, option: str) -> Path | None:
    """Check an output *file* path before work starts: not a directory, its directory creatable and writable."""
    if path is None:
        return None
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputPathError(f"{option} needs a file name")
    if path.is_dir():
        raise OutputPathError(f"{option} '{path}' is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{option} '{path}' exists and is not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} '{path}' is not writable")
    check_parent_writable(path, option)
    return path


def _given(paths: dict[str, Path | None]) -> list[tuple[str, Path, Path]]:
    """(option, path, absolute path) for each option given a path."""
    return [(option, path, Path(os.path.abspath(path))) for option, path in paths.items() if path is not None]


def check_distinct(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """No two outputs share a path, and no output overwrites one of the command's inputs."""
    seen: dict[Path, str] = {}
    for option, path, key in _given(outputs):
        if key in seen:
            raise OutputPathError(f"{option} and {seen[key]} are the same path '{path}'")
        seen[key] = option
    for option, path, key in _given(inputs):
        if key in seen:
            raise OutputPathError(f"{seen[key]} '{path}' would overwrite the {option} file")
        if key.exists():
            for out_key, out_option in seen.items():
                if out_key.exists() and os.path.samefile(out_key, key):
                    raise OutputPathError(f"{out_option} '{out_key}' would overwrite the {option} file")
