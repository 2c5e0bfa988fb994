"""The project's file layer: every path a user gives may be local or `gs://`.

Built on `etils.epath` (which Orbax and grain use too) with gcsfs as its gs:// backend, never
TensorFlow. What differs between the two kinds of storage is decided here and nowhere else:

- Whole-file writes are atomic. Locally: a temp file in the same folder, then a rename (the
  file gets the mode the umask allows, as any tool's output would). On gs:// an object write is
  atomic by itself and a rename is a copy plus a delete, so the final object is written
  directly; writers that need a local file (ArrayRecord, memory-mapped .npy) write a local temp
  file that is uploaded whole.
- Appending: gs:// has no append (gcsfs turns "a" into "w"). A `StagedFolder` is written
  locally and its changed files are uploaded whole on `sync()`; locally it is the folder itself.
- Reading part of a file (`read_range`) is one ranged GET on gs://.
- Conditional writes, for what one process at a time may own (runtime/lease.py): `create_new`
  writes a file only if none is there, `replace_if_unchanged` only if nobody replaced it since
  it was read (`read_versioned`). gs://: generation preconditions through google-cloud-storage
  (gcsfs has none). Locally: a complete temp file hard-linked to the path, which fails when the
  path exists (O_EXCL's guarantee, without a moment in which the file is empty); replacements
  under an flock of a sibling `.lock` file.

Errors name the path: a missing file is FileNotFoundError; a gs:// path without the client
library or without credentials is StorageError saying what to install or set.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

# epath picks TensorFlow's gfile for gs:// whenever TensorFlow is importable (users install it
# to prepare TFDS data); the project's one gs:// backend is gcsfs.
os.environ.setdefault("EPATH_USE_TF", "false")

import fsspec.config  # noqa: E402
from etils import epath  # noqa: E402

# gcsfs caches folder listings forever by default: a process that polls a run (a checkpoint
# folder, another host's shards) would never see new objects, and Orbax, sharing the instance,
# would restore a stale step.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False

INSTALL_HINT = "pip install -r requirements-train.txt (gcsfs, google-cloud-storage)"
CREDENTIALS_HINT = (
  "set up Google Cloud credentials (on a TPU VM the service account is used; elsewhere "
  "`gcloud auth application-default login` or GOOGLE_APPLICATION_CREDENTIALS=key.json; for a "
  "local emulator, the variables launch/gcs_emulator.py prints)"
)


class StorageError(OSError):
  """A path's storage cannot be reached: client library or credentials missing."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is on object storage (gs://, s3://, ...) rather than a local disk."""
  return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def absolute(path: str) -> str:
  """`path` made absolute; object-store URLs are absolute already."""
  return path if is_remote(path) else os.path.abspath(path)


def _is_auth_error(e: BaseException) -> bool:
  name = type(e).__name__
  if name in ("DefaultCredentialsError", "RefreshError", "TransportError"):
    return True
  code = getattr(e, "code", None) or getattr(e, "status", None)
  return code in (401, 403)


@contextlib.contextmanager
def _errors(path: str) -> Iterator[None]:
  """Turns the gs:// client's failures into errors that name `path` and the fix."""
  try:
    yield
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path} does not exist") from e
  except ImportError as e:
    if not is_remote(path):
      raise
    raise StorageError(f"{path}: reading or writing gs:// needs {INSTALL_HINT} ({e})") from e
  except Exception as e:
    if is_remote(path) and _is_auth_error(e):
      raise StorageError(
        f"{path}: access denied or no credentials: {CREDENTIALS_HINT} ({e})"
      ) from e
    raise


def _fs(path: str):
  """The fsspec file system of object-store URL `path` (epath's own instance)."""
  from etils.epath import backend

  return backend.fsspec_backend.fs(path)


_gcs_client = None


def _blob(path: str):
  """google-cloud-storage's handle of object `path` (gs://bucket/name), one client per process."""
  global _gcs_client
  if _gcs_client is None:
    from google.cloud import storage

    _gcs_client = storage.Client()
  bucket, _, name = path.removeprefix("gs://").partition("/")
  return _gcs_client.bucket(bucket).blob(name)


def reset_clients() -> None:
  """Forgets cached storage clients (after the environment that configures them changed)."""
  global _gcs_client
  from etils.epath import backend

  _gcs_client = None
  backend.fsspec_backend._get_filesystem.cache_clear()
  with contextlib.suppress(ImportError):
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()


def exists(path: str) -> bool:
  with _errors(path):
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
  with _errors(path):
    return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
  """The names in folder `path` (empty if it does not exist), sorted."""
  with _errors(path):
    folder = epath.Path(path)
    if not folder.exists():
      return []
    return sorted(p.name for p in folder.iterdir())


def makedirs(path: str) -> None:
  """Creates folder `path` and its parents (nothing to do on object storage)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  with _errors(path):
    epath.Path(path).unlink()


def rmtree(path: str) -> None:
  """Removes folder `path` and everything under it, if it exists."""
  with _errors(path):
    folder = epath.Path(path)
    if folder.exists():
      folder.rmtree()


def read_bytes(path: str) -> bytes:
  with _errors(path):
    return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  with _errors(path):
    return epath.Path(path).read_text()


def read_range(path: str, start: int, length: int) -> bytes:
  """`length` bytes of file `path` from offset `start` (one ranged request on gs://)."""
  with _errors(path):
    if is_remote(path):
      return _fs(path).cat_file(path, start=start, end=start + length)
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(length)


def read_json(path: str, error: type[Exception] = ValueError) -> Any:
  """The JSON value in `path`; `error` naming the file if it is missing or malformed."""
  try:
    text = read_text(path)
  except FileNotFoundError as e:
    raise error(f"{path} does not exist") from e
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise error(f"{path}: not valid JSON ({e})") from e


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


class StagedFile:
  """A local file (`.local`) that becomes `path` whole on `publish()`; `discard()` drops it.

  Locally it is a sibling temp file renamed over `path`; for object storage, a local temp file
  uploaded as the final object. Readers never see a partial file.
  """

  def __init__(self, path: str):
    self.path = path
    local_dir = None if is_remote(path) else (os.path.dirname(path) or ".")
    # A unique temp name: workers on several hosts may share a folder.
    fd, self.local = tempfile.mkstemp(dir=local_dir, prefix=os.path.basename(path) + ".tmp-")
    os.close(fd)

  def publish(self) -> None:
    if is_remote(self.path):
      with _errors(self.path):
        _fs(self.path).put_file(self.local, self.path)
      os.remove(self.local)
    else:
      os.chmod(self.local, 0o666 & ~_umask())  # mkstemp makes 0600; others may need to read it.
      os.replace(self.local, self.path)

  def discard(self) -> None:
    if os.path.exists(self.local):
      os.remove(self.local)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """`write(local_file)`, then `path` appears whole (see StagedFile)."""
  staged = StagedFile(path)
  try:
    write(staged.local)
    staged.publish()
  finally:
    staged.discard()


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically."""

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:
      f.write(data)

  atomic_write(path, write)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
  write_text(path, json.dumps(obj, indent=indent, sort_keys=indent is not None))


def _check_conditional(path: str) -> None:
  if is_remote(path) and not path.startswith("gs://"):
    raise ValueError(f"{path}: conditional writes are implemented for gs:// and local paths")


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def create_new(path: str, data: bytes) -> str | None:
  """Writes `data` to `path` if no file is there, atomically; returns the new file's version
  (see `read_versioned`), or None when a file was there. Of processes racing to create one
  path, exactly one succeeds."""
  _check_conditional(path)
  if is_remote(path):
    from google.api_core import exceptions

    blob = _blob(path)
    with _errors(path):
      try:
        blob.upload_from_string(data, if_generation_match=0)
      except exceptions.PreconditionFailed:
        return None
    return str(blob.generation)
  staged = StagedFile(path)
  try:
    with open(staged.local, "wb") as f:
      f.write(data)
    os.chmod(staged.local, 0o666 & ~_umask())
    try:
      os.link(staged.local, path)
    except FileExistsError:
      return None
  finally:
    staged.discard()
  return _digest(data)


def read_versioned(path: str) -> tuple[bytes, str]:
  """The content of `path` and its version: on gs:// the object's generation, locally the
  content's digest (a file rewritten with the same bytes counts as unchanged)."""
  _check_conditional(path)
  if is_remote(path):
    from google.api_core import exceptions

    blob = _blob(path)
    with _errors(path):
      try:
        data = blob.download_as_bytes()
      except exceptions.NotFound as e:
        raise FileNotFoundError(f"{path} does not exist") from e
    return data, str(blob.generation)
  data = read_bytes(path)
  return data, _digest(data)


def replace_if_unchanged(path: str, data: bytes, version: str) -> str | None:
  """Replaces `path` with `data` if it still has `version`; returns the new version, or None
  when another writer replaced (or removed) it first. Atomic, like `create_new`."""
  _check_conditional(path)
  if is_remote(path):
    from google.api_core import exceptions

    blob = _blob(path)
    with _errors(path):
      try:
        blob.upload_from_string(data, if_generation_match=int(version))
      except exceptions.PreconditionFailed:
        return None
    return str(blob.generation)
  with open(path + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, or its process dies.
    try:
      current = read_bytes(path)
    except FileNotFoundError:
      return None
    if _digest(current) != version:
      return None
    write_bytes(path, data)
  return _digest(data)


def save_image(path: str, image: Any) -> None:
  """Writes a PIL image to `path` as PNG, atomically."""
  atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def is_temp_name(name: str) -> bool:
  """Whether a file name is one of `atomic_write`'s temp files (left by a killed writer)."""
  return ".tmp-" in name


def upload_tree(local: str, destination: str) -> None:
  """Copies local folder `local` to `destination` (local or remote), file by file, atomically."""
  for name in sorted(os.listdir(local)):
    src, dst = os.path.join(local, name), os.path.join(destination, name)
    if os.path.isdir(src):
      upload_tree(src, dst)
    else:
      makedirs(destination)
      atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))


class StagedFolder:
  """A folder that programs write with plain local file calls (appends, TensorBoard's writer),
  published to `path` on `sync()`.

  For a local `path` it is that folder and `sync()` has nothing to do. For object storage
  (no append, renames are copies) it is a local temp folder: `sync()` uploads each file that
  changed since the last sync as a whole object. Files named in `resume` are downloaded first,
  so that a restarted run appends to them (metrics.jsonl).
  """

  def __init__(self, path: str, resume: tuple[str, ...] = ()):
    self.path = path
    self._synced: dict[str, tuple[int, int]] = {}
    if not is_remote(path):
      makedirs(path)
      self.local = path
      return
    self.local = tempfile.mkdtemp(prefix="genmask-staged-")
    for name in resume:
      if exists(os.path.join(path, name)):
        with _errors(path):
          _fs(path).get_file(os.path.join(path, name), os.path.join(self.local, name))

  def sync(self) -> None:
    if self.local == self.path:
      return
    for folder, _, names in os.walk(self.local):
      for name in names:
        local = os.path.join(folder, name)
        stat = os.stat(local)
        if self._synced.get(local) != (stat.st_size, stat.st_mtime_ns):
          target = os.path.join(self.path, os.path.relpath(local, self.local))
          atomic_write(target, lambda tmp, local=local: shutil.copyfile(local, tmp))
          self._synced[local] = (stat.st_size, stat.st_mtime_ns)

  def close(self) -> None:
    self.sync()
    if self.local != self.path:
      shutil.rmtree(self.local, ignore_errors=True)
