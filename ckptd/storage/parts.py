"""How many bytes go in each request of a big upload, chosen from the file's size.

The request count of a checkpoint is what scales with the cluster (S3 bills, and throttles, per
request: 3,500 PUT/POST per second per prefix partition), so large files go in large parts:
about ``TARGET_PARTS`` per file, never smaller than the store's configured minimum (which keeps
small files in many small parts, several in flight, for speed) and, on S3, never larger than
``MAX_AUTO_PART`` unless the 10,000-part limit demands it (a part is held in memory while it is
sent, so parts in flight x part size is the daemon's upload memory). A 10 GB shard goes in 38
parts of 256 MiB: 8,000 such shards need about 320,000 requests, not the 1.2 million of 8 MiB
parts. GCS streams each request from the file, so its chunks may grow larger; they stay
multiples of 256 KiB as the resumable protocol requires.

Pure functions, no I/O: the backends call them once per file and S3 records the result in the
upload journal, so a resumed upload keeps the part size it started with.
"""

from __future__ import annotations

from ..errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30

S3_MIN_PART = 5 * MiB  # S3's minimum for every part but the last
S3_MAX_PART = 5 * GiB
S3_MAX_PARTS = 10_000
GCS_QUANTUM = 256 << 10  # every resumable chunk but the last is a multiple of this

TARGET_PARTS = 32
"""Requests per big file aimed at: enough to keep several parts of one file in flight."""
MAX_AUTO_PART = 256 * MiB
"""The largest S3 part chosen for request economy alone (memory: in flight x part size)."""
GCS_MAX_AUTO_CHUNK = 512 * MiB
"""The largest GCS chunk chosen for request economy (a failed chunk is resent from the last
offset the server confirmed, so a chunk is also the most a failure can cost)."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, quantum: int) -> int:
    return _ceil_div(n, quantum) * quantum


def s3_part_size(
    size: int,
    min_part: int,
    *,
    target_parts: int = TARGET_PARTS,
    max_auto_part: int = MAX_AUTO_PART,
) -> int:
    """The part size (whole MiB, within 5 MiB..5 GiB) for an S3 multipart upload of ``size``.

    ``ceil(size / target_parts)`` rounded up to a MiB, at least ``min_part`` and at most
    ``max_auto_part`` (or ``min_part`` if that is larger), then grown if needed to fit the file in
    10,000 parts. ``ConfigError`` when even 10,000 parts of 5 GiB cannot hold it.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not S3_MIN_PART <= min_part <= S3_MAX_PART:
        raise ConfigError(f"part size must be within 5 MiB..5 GiB (S3 limits), got {min_part}")
    if target_parts < 1:
        raise ValueError(f"target_parts must be >= 1, got {target_parts}")
    part = _round_up(max(_ceil_div(size, target_parts), 1), MiB)
    part = max(min_part, min(part, max(max_auto_part, min_part)))
    part = max(part, _round_up(max(_ceil_div(size, S3_MAX_PARTS), 1), MiB))
    if part > S3_MAX_PART:
        raise ConfigError(f"an object of {size} bytes exceeds S3's limit of 10,000 x 5 GiB")
    return part


def gcs_chunk_size(
    size: int,
    min_chunk: int,
    *,
    target_parts: int = TARGET_PARTS,
    max_auto_chunk: int = GCS_MAX_AUTO_CHUNK,
) -> int:
    """The request size of a GCS resumable upload of ``size``: a multiple of 256 KiB.

    ``ceil(size / target_parts)`` rounded up to 256 KiB, at least ``min_chunk`` (the store's
    configured chunk size) and at most ``max_auto_chunk`` (or ``min_chunk`` if that is larger).
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if min_chunk <= 0 or min_chunk % GCS_QUANTUM:
        raise ConfigError(f"chunk size must be a positive multiple of 256 KiB, got {min_chunk}")
    if target_parts < 1:
        raise ValueError(f"target_parts must be >= 1, got {target_parts}")
    chunk = _round_up(max(_ceil_div(size, target_parts), 1), GCS_QUANTUM)
    return max(min_chunk, min(chunk, max(_round_up(max_auto_chunk, GCS_QUANTUM), min_chunk)))


def part_count(size: int, part: int) -> int:
    """Requests that carry the bytes of ``size`` in parts of ``part`` (the last may be smaller)."""
    if part <= 0:
        raise ValueError(f"part must be > 0, got {part}")
    return max(1, _ceil_div(size, part))


__all__ = [
    "GCS_MAX_AUTO_CHUNK",
    "MAX_AUTO_PART",
    "S3_MAX_PART",
    "S3_MAX_PARTS",
    "S3_MIN_PART",
    "TARGET_PARTS",
    "gcs_chunk_size",
    "part_count",
    "s3_part_size",
]


MIN_READ_PART = 16 * MiB
MAX_READ_PART = 128 * MiB


def read_part_for(size: int, workers: int) -> int:
    """The range size of a concurrent ranged read of ``size`` bytes by ``workers``: one range
    per worker where that stays within 16..128 MiB. Few large ranges, because every GET has a
    fixed cost (a round trip on S3; on moto and other test servers a read of the whole object
    per range), and still one range per worker, so that a file is read over all connections."""
    per_worker = _ceil_div(max(size, 1), max(workers, 1))
    return min(MAX_READ_PART, max(MIN_READ_PART, _round_up(per_worker, MiB)))
