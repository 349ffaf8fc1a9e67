"""One exception tree for everything ckptd raises.

    CkptdError
    ├── ConfigError             bad argument, URL, name or option (the user must change something)
    ├── SerializationError      state that is not plain data / not a tensor (raised before staging)
    ├── DaemonUnavailableError  no daemon on the socket, or the connection to it was lost
    ├── ProtocolError           a malformed, truncated or oversized message on the socket
    ├── SaveError               the daemon could not commit or upload a checkpoint
    ├── AlreadyExistsError      the tag (or object) exists and is never overwritten (also a
    │                           FileExistsError)
    ├── RestoreError            a DDP broadcast restore failed on the saving rank
    ├── IntegrityError          a file does not match its manifest (size or checksum), or is torn
    ├── NotFoundError           no such checkpoint, object or run (also a FileNotFoundError)
    └── StorageError            an object store operation failed
        ├── TransientStorageError   worth retrying: 5xx, throttling, timeouts, resets
        │   ├── StoreUnreachableError   no answer at all: refused, reset, timed out
        │   └── ThrottledError      the store asked us to slow down (SlowDown, 503, 429)
        └── PermanentStorageError   retrying will not help: 403, no bucket, bad credentials
            ├── BucketMissingError  the bucket does not exist (it may be created later)
            └── AccessDeniedError   the store refuses these credentials this access
                └── CredentialsError    no credentials found, or the store rejected them

Retry decisions look at the type alone. Errors from the layers below (botocore, aiohttp, OSError)
are translated at one boundary per backend.
"""

from __future__ import annotations


class CkptdError(Exception):
    """Base of every error ckptd raises on purpose."""


class ConfigError(CkptdError, ValueError):
    """A wrong argument, option, URL or name."""


class SerializationError(CkptdError, TypeError):
    """Something in the state is not a tensor or plain data; nothing was staged."""


class DaemonUnavailableError(CkptdError, ConnectionError):
    """The daemon cannot be reached, or went away."""


class ProtocolError(CkptdError):
    """A message on the socket is malformed, truncated, oversized or of the wrong shape."""


class SaveError(CkptdError):
    """The daemon failed to commit or upload a checkpoint."""


class AlreadyExistsError(CkptdError, FileExistsError):
    """The checkpoint or object exists already; ckptd never overwrites committed data."""


class RestoreError(CkptdError):
    """In a DDP broadcast restore, the saving rank failed; raised on the other ranks."""


class IntegrityError(CkptdError):
    """A stored file does not match what its manifest records."""


class NotFoundError(CkptdError, FileNotFoundError):
    """No such checkpoint, run or object."""


class StorageError(CkptdError):
    """An object store operation failed."""


class TransientStorageError(StorageError):
    """A storage failure that a retry may fix (5xx, throttling, timeout, reset)."""


class PermanentStorageError(StorageError):
    """A storage failure that retrying will not fix (access denied, no such bucket)."""


class ThrottledError(TransientStorageError):
    """The store asked us to slow down (S3 ``SlowDown``/503, ``RequestLimitExceeded``, GCS 429):
    retried like any transient error, from a longer backoff."""


class StoreUnreachableError(TransientStorageError):
    """The store did not answer at all (connection refused or reset, DNS, timeout): the store or
    the network is down, as opposed to a store that answers with an error."""


class BucketMissingError(PermanentStorageError):
    """The bucket does not exist. Permanent for a request, but a bucket can be (re)created, so
    the daemon re-checks an upload that met this with a long backoff."""


class AccessDeniedError(PermanentStorageError):
    """The store answered 401/403: these credentials may not do this."""


class CredentialsError(AccessDeniedError):
    """No credentials were found for the store, or the store rejected the ones it was given."""


__all__ = [
    "AccessDeniedError",
    "AlreadyExistsError",
    "BucketMissingError",
    "CkptdError",
    "ConfigError",
    "CredentialsError",
    "DaemonUnavailableError",
    "IntegrityError",
    "NotFoundError",
    "PermanentStorageError",
    "ProtocolError",
    "RestoreError",
    "SaveError",
    "SerializationError",
    "StorageError",
    "StoreUnreachableError",
    "ThrottledError",
    "TransientStorageError",
]
