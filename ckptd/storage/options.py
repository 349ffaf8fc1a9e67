"""Store options: server-side encryption and storage class, set per daemon, checked at start.

``ckptd serve --sse aws:kms --kms-key KEY --storage-class STANDARD_IA`` applies them to every
object the daemon writes to an S3 store; for GCS, ``--kms-key`` is the CMEK ``kmsKeyName`` and
``--storage-class`` the object's class. Per run, the store URL's query sets them over the
daemon's (``s3://bucket/prefix?sse=aws:kms&kms_key=KEY&storage_class=STANDARD_IA``), so a
``Checkpointer(store=...)`` chooses its own without a protocol change. Unknown values are refused before anything is written,
and the options a checkpoint was written with are recorded in its manifest (``store_options``).
Classes that need a restore before a read (S3 GLACIER, DEEP_ARCHIVE) are refused: a checkpoint
that ``load`` cannot read at once is not one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigError

S3_SSE = ("AES256", "aws:kms", "aws:kms:dsse")
S3_CLASSES = (
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "REDUCED_REDUNDANCY",
    "EXPRESS_ONEZONE",
)
"""The S3 storage classes readable at once (GLACIER and DEEP_ARCHIVE need a restore first)."""
GCS_CLASSES = ("STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")
_GCS_KEY = re.compile(r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$")


@dataclass(frozen=True, slots=True)
class StoreOptions:
    sse: str | None = None
    """S3 server-side encryption: ``AES256`` (SSE-S3), ``aws:kms`` or ``aws:kms:dsse``."""
    kms_key: str | None = None
    """S3: the SSE-KMS key id or ARN; GCS: the CMEK ``kmsKeyName``."""
    storage_class: str | None = None

    def __bool__(self) -> bool:
        return any((self.sse, self.kms_key, self.storage_class))

    def check(self, scheme: str) -> StoreOptions:
        """Refuse values the backend for ``scheme`` (``s3``, ``gs``, other) would not take."""
        if not self:
            return self
        if scheme == "s3":
            if self.sse is not None and self.sse not in S3_SSE:
                raise ConfigError(f"unknown --sse {self.sse!r}: use one of {', '.join(S3_SSE)}")
            if self.kms_key is not None and not (self.sse or "").startswith("aws:kms"):
                raise ConfigError("--kms-key on S3 needs --sse aws:kms (or aws:kms:dsse)")
            if self.storage_class is not None and self.storage_class not in S3_CLASSES:
                raise ConfigError(
                    f"unknown or unreadable S3 --storage-class {self.storage_class!r}: use one "
                    f"of {', '.join(S3_CLASSES)} (GLACIER/DEEP_ARCHIVE need a restore to read)"
                )
        elif scheme in ("gs", "gcs"):
            if self.sse is not None:
                raise ConfigError("--sse is for S3; GCS encrypts always (CMEK: --kms-key)")
            if self.kms_key is not None and not _GCS_KEY.match(self.kms_key):
                raise ConfigError(
                    f"GCS --kms-key {self.kms_key!r} must be projects/P/locations/L/keyRings/R/"
                    "cryptoKeys/K"
                )
            if self.storage_class is not None and self.storage_class not in GCS_CLASSES:
                raise ConfigError(
                    f"unknown GCS --storage-class {self.storage_class!r}: use one of "
                    f"{', '.join(GCS_CLASSES)}"
                )
        else:
            raise ConfigError(f"store options (--sse, --kms-key, --storage-class) need S3 or GCS, "
                              f"not a {scheme or 'local'} store")  # fmt: skip
        return self

    def s3_args(self) -> dict[str, str]:
        """Keyword arguments for PutObject / CreateMultipartUpload."""
        out: dict[str, str] = {}
        if self.sse:
            out["ServerSideEncryption"] = self.sse
        if self.kms_key:
            out["SSEKMSKeyId"] = self.kms_key
        if self.storage_class:
            out["StorageClass"] = self.storage_class
        return out

    def as_dict(self) -> dict[str, Any]:
        """What the manifest records: the options that are set."""
        out = {"sse": self.sse, "kms_key": self.kms_key, "storage_class": self.storage_class}
        return {k: v for k, v in out.items() if v is not None}


NONE = StoreOptions()

_URL_KEYS = ("sse", "kms_key", "storage_class")


def url_options(url: str, base: StoreOptions | None = None) -> StoreOptions:
    """``base`` (the daemon's options) with those the URL's query sets on top; a key that is
    not an option, or one given twice, is refused (a typo must not mean "unencrypted")."""
    query = urlsplit(url).query
    opts = base or NONE
    if not query:
        return opts
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as e:
        raise ConfigError(f"store URL {url!r}: bad query ({e})") from e
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key not in _URL_KEYS:
            raise ConfigError(
                f"store URL {url!r}: unknown option {key!r} (use {', '.join(_URL_KEYS)})"
            )
        if key in seen:
            raise ConfigError(f"store URL {url!r}: option {key!r} given twice")
        if not value:
            raise ConfigError(f"store URL {url!r}: option {key!r} is empty")
        seen[key] = value
    return replace(opts, **seen)


def without_query(url: str) -> str:
    """The URL without its options, for messages and the identity of the place."""
    return url.split("?", 1)[0]


__all__ = ["GCS_CLASSES", "NONE", "S3_CLASSES", "S3_SSE", "StoreOptions", "url_options"]
