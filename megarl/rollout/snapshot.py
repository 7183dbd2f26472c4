"""The latest weights, kept as safetensors files so that a restarted engine can be given them.

Every weight update writes its buckets here (:func:`megarl.rollout.bucket_files.write_bucket`)
into a directory for its version, ``weights-v{version}``; once the last bucket is written the
directory is complete, the previous version's is deleted, and the new one is what restarts and
the ``disk`` transport load (SGLang's ``/update_weights_from_disk`` takes a model directory, so
the base model's config and tokenizer files are copied in beside the weights).

Cost: one host copy of the streamed (HF) weights, two while an update is being written, on the
root's file system. The directory is deleted at shutdown; a trainer killed outright (SIGKILL)
after its first update leaves it behind. The default root is ``/dev/shm`` (memory) where it exists, which is also what
lets the ``hf`` engine map the bucket files as its tensor transport; on GPUs it adds one
device-to-host copy of every bucket per update.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from megarl.rollout.bucket_files import write_bucket
from megarl.weights.bucket import Bucket

_SHARED_MEMORY = Path("/dev/shm")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def default_root() -> Path:
    """``/dev/shm`` where it exists (Linux), else the system's temporary directory."""
    return _SHARED_MEMORY if _SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())


class WeightSnapshot:
    """Versioned directories of bucket files under a private directory of ``root``.

    Args:
        root: where to create the private directory; :func:`default_root` when None.
        base_model: the engines' model directory, whose non-weight files are copied into each
            version so that it is a loadable model directory.
    """

    def __init__(self, root: Path | None, base_model: Path):
        self.root = Path(root or default_root())
        self.directory: Path | None = None
        """The private directory, made by the first :meth:`begin` (so a run killed before its first
        update leaves nothing behind)."""
        self.base_model = Path(base_model)
        self.version: str | None = None
        """The version of the last complete update, None before the first."""
        self._writing: Path | None = None
        self._pending_version: str | None = None
        self._count = 0

    @property
    def current(self) -> Path | None:
        """The directory of the last complete version, None before the first update."""
        return None if self.version is None else self.directory / f"weights-v{self.version}"

    def begin(self, version: str) -> None:
        """Start writing ``version`` (discarding any unfinished one)."""
        self.abort()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="megarl-weights-", dir=self.root))
        self._writing = self.directory / f"weights-v{version}.partial"
        self._writing.mkdir()
        self._count = 0
        self._pending_version = version

    def add(self, bucket: Bucket) -> tuple[Path, int]:
        """Write one bucket of the version being written.

        Returns:
            The file and the byte offset of the bucket's buffer in it.
        """
        if self._writing is None:
            raise RuntimeError("WeightSnapshot.add called outside begin() ... commit()")
        path = self._writing / f"bucket-{self._count:05d}.safetensors"
        self._count += 1
        return path, write_bucket(path, bucket)

    def commit(self) -> Path:
        """Make the version being written the current one; delete the previous one.

        Returns:
            The new current directory.
        """
        if self._writing is None:
            raise RuntimeError("WeightSnapshot.commit called without begin()")
        for source in self.base_model.iterdir():
            if source.is_file() and not source.name.endswith(_WEIGHT_SUFFIXES) and not source.name.endswith(".index.json"):
                shutil.copy2(source, self._writing / source.name)
        previous = self.current
        final = self.directory / f"weights-v{self._pending_version}"
        if final.exists():
            shutil.rmtree(final)
        self._writing.rename(final)
        self._writing = None
        self.version = self._pending_version
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
        return final

    def abort(self) -> None:
        """Discard the version being written, if any."""
        if self._writing is not None:
            shutil.rmtree(self._writing, ignore_errors=True)
            self._writing = None

    def close(self) -> None:
        """Delete every file of the snapshot."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self._writing = None
        self.version = None
