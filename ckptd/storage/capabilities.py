"""What an object store really does, as probed once at start, and the fallback each gap gets.

S3-compatible servers differ in exactly the features ckptd's guarantees lean on: moto stores a
declared CRC32C without checking it, s3rver and Ceph RGW neither store nor check one, s3rver
ignores ``If-None-Match: *`` and has no ListParts / ListMultipartUploads / Abort, Cloudflare R2
takes CRC32C multipart checksums as COMPOSITE only. So nothing is assumed: a backend probes under
``<prefix>/.ckptd/probe-<random>`` (deleted afterwards) and every write consults the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PROBE_DIR = ".ckptd"
"""The store's reserved prefix for probe objects (a name no run can take: runs never start with
a dot)."""

FULL_OBJECT, COMPOSITE, NO_CHECKSUM = "FULL_OBJECT", "COMPOSITE", "NONE"
"""How multipart uploads carry CRC32C: whole-object (S3), per part combined (R2), not at all."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Probed facts about one store. The defaults are a store that needs no fallback."""

    verifies_checksums: bool = True
    """A PUT with a wrong ``x-amz-checksum-crc32c`` is refused."""
    reports_checksums: bool = True
    """HeadObject (ChecksumMode=ENABLED) reports the CRC32C of the stored bytes, not an echo of
    whatever the client declared."""
    verifies_md5: bool = True
    """A PUT with a wrong ``Content-MD5`` is refused."""
    etag_is_md5: bool = False
    """A single PUT's ETag is the MD5 of the bytes the server stored (so it can be compared)."""
    create_only: bool = True
    """``If-None-Match: *`` on an existing key is refused with 412."""
    list_parts: bool = True
    list_uploads: bool = True
    abort_uploads: bool = True
    multipart_checksum: str = FULL_OBJECT
    """``FULL_OBJECT``, ``COMPOSITE`` or ``NONE``: what CreateMultipartUpload + Complete took."""
    sends_checksums: bool = True
    """Whether ckptd sends CRC32C headers at all (botocore's ``request_checksum_calculation``
    set to ``when_required`` by the user turns them off)."""

    @property
    def integrity(self) -> str:
        """How an upload's bytes are checked, strongest first:

        ``crc32c``: the server refuses a wrong CRC32C; ``md5``: it refuses a wrong Content-MD5;
        ``etag-md5``: its ETag (the MD5 it computed) is compared with ours; ``read-back``: the
        object is read back and its CRC32C compared before the manifest is written. A reported
        CRC32C (``reports_checksums``) is compared after a multipart upload as well, but is not
        a mode of its own: not every reply carries it."""
        if self.sends_checksums and self.verifies_checksums:
            return "crc32c"
        if self.verifies_md5:
            return "md5"
        if self.etag_is_md5:
            return "etag-md5"
        return "read-back"

    def missing(self) -> list[str]:
        """The features this store lacks, each with the fallback ckptd uses instead."""
        out = []
        if self.integrity != "crc32c":
            out.append(f"server-checked CRC32C (fallback: {self.integrity})")
        if not self.create_only:
            out.append("create-only writes (fallback: check before, read back after)")
        if not self.list_parts:
            out.append("ListParts (fallback: resume from the journal's own parts)")
        if not self.list_uploads:
            out.append("ListMultipartUploads (fallback: gc cannot reap stale uploads)")
        if not self.abort_uploads:
            out.append("AbortMultipartUpload (fallback: abandoned parts stay)")
        if self.multipart_checksum != FULL_OBJECT:
            out.append(f"FULL_OBJECT multipart CRC32C (fallback: {self.multipart_checksum})")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "integrity": self.integrity, "missing": self.missing()}

    def summary(self, url: str) -> str:
        """One log line for ``url``."""
        gaps = self.missing()
        return f"store {url}: " + ("every capability ckptd uses" if not gaps else "; ".join(gaps))


FULL = Capabilities()
"""A store with nothing to fall back from (local, memory, GCS: its JSON API checks CRC32C and
honours ``ifGenerationMatch=0``)."""


__all__ = ["COMPOSITE", "FULL", "FULL_OBJECT", "NO_CHECKSUM", "PROBE_DIR", "Capabilities"]
