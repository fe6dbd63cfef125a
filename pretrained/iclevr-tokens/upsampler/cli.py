"""What every script shares: bad input as one line, and files that are complete or absent.

- `UserError` is any problem with the user's input or environment; `run_cli` runs a script's main() and prints
  it as one `error: ...` line with a non-zero exit code, never a traceback.
- `replacing` (one file) and `publish_dir` (a folder) write under a temporary name and move the result into
  place in one rename, so a reader sees the old version or the new one, never half of one.
- A folder published with a manifest (checkpoints, model folders) records every file's size and SHA-256, so
  damage done to it later (a copy cut short, a flipped bit, a hand edit) is found by `manifest_problem`.
"""
import hashlib
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment; shown as one line, never as a traceback."""

    exit_code = 2


def run_cli(main):
    """Run a script's main(); user errors become `error: ...` on stderr and exit code 2, and warnings are
    one `warning: ...` line each."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


def warn(message):
    """Something the user should know that does not stop the run: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def read_json(path, what="file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read ({error})")


# ---------------------------------------------------------------------------------------------------------
# Output folders: complete or absent


def fsync_tree(path):
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def publish_dir(temp, final, manifest=False):
    """Move a fully written folder into place so readers only ever see complete ones; with `manifest`, its
    manifest.json is written last, inside the temporary folder, so every published folder has a whole one."""
    if manifest:
        write_manifest(temp)
    fsync_tree(temp)
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(temp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replacing(path):
    """Yield a temporary path beside `path` (same folder and suffix); once the block has written it, it replaces
    `path` in one rename. On failure it is removed: readers see the old file or the new one, never half of one."""
    path = Path(path)
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def make_output_dir(path):
    """Create an output folder, or say in one line why it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {path}: {error.strerror or error}")
    return path


# ---------------------------------------------------------------------------------------------------------
# Manifests: folders that can tell whether they are still what was written

MANIFEST = "manifest.json"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder):
    """FOLDER/manifest.json: the size and SHA-256 of every other file below it but a model card (README.md, which
    is documentation, free to edit)."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(folder.rglob("*"))
             if path.is_file() and path not in (folder / MANIFEST, folder / "README.md")}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def manifest_problem(folder):
    """None when every file the folder's manifest lists has its recorded size and SHA-256; else the first
    problem, in a phrase that names the file. Files added later are not checked."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a readable manifest"
    for name, (size, _) in listed.items():  # sizes first: a cut file is found without reading everything
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when written"
    for name, (_, sha256) in listed.items():
        if file_sha256(folder / name) != sha256:
            return f"{name} is not what was written (SHA-256 differs)"
    return None


def folder_megabytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6
