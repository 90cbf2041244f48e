"""The base of the store classes opened from a folder (``IndexFolder``, ``CurvatureFolder``)."""

from __future__ import annotations

from pathlib import Path


class ArtifactFolder:
    """An artifact's folder: ``Cls(path)`` names it (it need not exist yet: its stage writes it), ``Cls.open(path)``
    is one that holds the artifact (``exists``), else ``missing()`` is raised. Holds nothing but its path: it
    pickles to Ray actors as that, compares by it, and every read reads the files as they are now."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def open(cls, path):
        """The folder at ``path``, after checking that the artifact is there (else ``missing()``)."""
        folder = cls(path)
        if not folder.exists():
            raise folder.missing()
        return folder

    def exists(self) -> bool:
        raise NotImplementedError

    def missing(self) -> Exception:
        """The named error ``open`` raises when the artifact is not there."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.path == self.path

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.path))
