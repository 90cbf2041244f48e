"""Named exceptions. Each message names the file, layer, example or value at fault."""


class LorifError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(LorifError, ValueError):
    """An invalid setting (f, c, r, dtype, method, paths ...)."""


class DataError(LorifError, ValueError):
    """Training or query data that cannot be used (missing file or column, empty set)."""


class NoLossTokensError(DataError):
    """Examples whose every label is ignored (-100), e.g. a prompt longer than max_length."""


class IndexNotFoundError(LorifError, FileNotFoundError):
    """No index (manifest) where one is expected."""


class MissingShardError(LorifError, FileNotFoundError):
    """A shard listed in a manifest is not on disk."""


class CorruptArtifactError(LorifError, ValueError):
    """A stored artifact (shard, curvature layer, stored g'_t, K-FAC statistics, header) whose bytes do not
    match the checksum, size or layout written with it; the message names the file and the command that
    rebuilds it."""


class CorruptShardError(CorruptArtifactError):
    """A shard whose checksum, row count or schema does not match its manifest."""


class UnsafePathError(LorifError, ValueError):
    """A path read from a manifest, record, header or meta that resolves outside its folder (``..``, an
    absolute path, a symlink out of it)."""


class FolderLockedError(LorifError, RuntimeError):
    """Another run holds the writer lock of a folder; the message names its pid, host and start."""


class StorageFullError(LorifError, OSError):
    """A write that found no space left (ENOSPC, EDQUOT) or hit a file-size limit (EFBIG); the message names
    the path and, where known, the bytes needed."""


class IndexMismatchError(LorifError, ValueError):
    """An existing index or curvature made with another config, model or layer list."""


class ModelMismatchError(IndexMismatchError):
    """The model at query time is not the model the index was built from."""


class NonFiniteGradientError(LorifError, FloatingPointError):
    """NaN or Inf in a per-example gradient."""


class ClusterLostError(LorifError, RuntimeError):
    """Ray lost the driver's own node (its raylet died) mid-stage; finished work is kept for a re-run."""


class RequestError(LorifError, ValueError):
    """A request to the query service that cannot be answered (bad JSON, wrong types, too large, no token);
    ``status`` is its HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CorruptModelError(LorifError, ValueError):
    """A model file that cannot be read (a config.json or safetensors file cut short, a bad header): the file is
    named, with what is wrong."""
class QueryRunError(LorifError, ValueError):
    """A query run's folder that cannot be read: no run there, a format this version does not read, or files
    of another run."""
