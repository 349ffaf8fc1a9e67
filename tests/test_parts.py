"""Part and chunk sizes from the file size (``ckptd.storage.parts``), and their wiring: S3 and
GCS choose them per file, and a resumed S3 upload keeps the part size its journal recorded."""

from __future__ import annotations

import json
import math
import os

import crc32c
import pytest

from ckptd.errors import ConfigError, TransientStorageError
from ckptd.storage.gcs import GCSStore
from ckptd.storage.parts import (
    GCS_QUANTUM,
    MAX_AUTO_PART,
    S3_MAX_PART,
    S3_MAX_PARTS,
    S3_MIN_PART,
    gcs_chunk_size,
    part_count,
    s3_part_size,
)
from ckptd.storage.s3 import S3Store
from tests.faultproxy import FaultProxy

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GB = 10**9


@pytest.mark.parametrize(
    "size",
    [0, 1, 5 * MiB, 8 * MiB + 1, 100 * MiB, 255 * MiB, GiB, 10 * GB, 10 * GiB, 100 * GB,
     3 << 40, 48 << 40],
)  # fmt: skip
@pytest.mark.parametrize("min_part", [S3_MIN_PART, 8 * MiB, 64 * MiB])
def test_s3_part_size_stays_within_s3_limits(size: int, min_part: int) -> None:
    part = s3_part_size(size, min_part)
    assert part % MiB == 0 and min_part <= part <= S3_MAX_PART
    assert part_count(size, part) <= S3_MAX_PARTS
    # never bigger than needed: the cap, or what 10,000 parts need, or the configured minimum
    fit = math.ceil(math.ceil(size / S3_MAX_PARTS) / MiB) * MiB  # what 10,000 parts need
    assert part <= max(MAX_AUTO_PART, min_part, fit)


def test_small_files_keep_the_configured_parts_and_big_files_get_big_ones() -> None:
    assert s3_part_size(20 * MiB, 8 * MiB) == 8 * MiB  # several parts in flight
    assert s3_part_size(256 * MiB, 8 * MiB) == 8 * MiB  # 32 parts of the minimum
    assert s3_part_size(1 * GiB, 8 * MiB) == 32 * MiB  # 32 parts
    assert s3_part_size(10 * GB, 8 * MiB) == 256 * MiB  # capped: 38 parts
    assert part_count(10 * GB, 256 * MiB) == 38
    assert part_count(10 * GiB, s3_part_size(10 * GiB, 8 * MiB)) == 40
    assert s3_part_size(4 << 40, 8 * MiB) == 420 * MiB  # 4 TiB needs more than 256 MiB parts
    assert part_count(4 << 40, 420 * MiB) <= S3_MAX_PARTS


def test_the_rule_keeps_a_1000_node_checkpoint_well_under_a_million_puts() -> None:
    shards = 1000 * 8
    per_file = part_count(10 * GB, s3_part_size(10 * GB, 8 * MiB)) + 2  # + Create + Complete
    assert shards * per_file == 320_000
    old = part_count(10 * GB, 8 * MiB) + 2  # the fixed 8 MiB parts this replaces
    assert shards * old > 9_500_000


def test_s3_part_size_refuses_what_s3_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="10,000"):
        s3_part_size(S3_MAX_PARTS * S3_MAX_PART + 1, 8 * MiB)
    assert s3_part_size(S3_MAX_PARTS * S3_MAX_PART, 8 * MiB) == S3_MAX_PART
    with pytest.raises(ConfigError):
        s3_part_size(10, 4 * MiB)  # below S3's minimum part
    with pytest.raises(ValueError):
        s3_part_size(-1, 8 * MiB)


@pytest.mark.parametrize("size", [0, 1, 16 * MiB + 3, GiB, 10 * GB, 100 * GB, 3 << 40])
@pytest.mark.parametrize("min_chunk", [GCS_QUANTUM, 8 * MiB, 128 * MiB, 3 * GCS_QUANTUM])
def test_gcs_chunks_are_multiples_of_256_kib(size: int, min_chunk: int) -> None:
    chunk = gcs_chunk_size(size, min_chunk)
    assert chunk % GCS_QUANTUM == 0 and chunk >= min_chunk


def test_gcs_chunk_grows_with_the_file() -> None:
    assert gcs_chunk_size(GiB, 128 * MiB) == 128 * MiB  # the default chunk: 8 requests
    chunk = gcs_chunk_size(10 * GB, 128 * MiB)
    assert part_count(10 * GB, chunk) == 32 and chunk < 300 * MiB
    assert gcs_chunk_size(100 * GB, 128 * MiB) == 512 * MiB  # capped
    with pytest.raises(ConfigError, match="256 KiB"):
        gcs_chunk_size(GiB, 100 * KiB)


def test_stores_choose_per_file() -> None:
    s3 = S3Store("b", part_size=8 * MiB)
    assert s3.part_size_for(10 * GB) == 256 * MiB and s3.part_size_for(9 * MiB) == 8 * MiB
    gcs = GCSStore("b", chunk_size=128 * MiB)
    assert gcs.chunk_size_for(10 * GB) == gcs_chunk_size(10 * GB, 128 * MiB)
    assert gcs.chunk_size_for(1) == 128 * MiB


async def test_resumed_s3_upload_keeps_the_journals_part_size(
    s3_proxy: FaultProxy, s3_bucket: str, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A daemon restarted with another part size (or a newer rule) resumes in the old parts."""
    data = os.urandom(3 * S3_MIN_PART + 7)
    path = os.path.join(tmp_path, "w.bin")
    with open(path, "wb") as f:
        f.write(data)
    crc, journal = crc32c.crc32c(data), os.path.join(tmp_path, "w.journal")
    first = S3Store(s3_bucket, "runs", part_size=S3_MIN_PART, max_concurrency=1,
                    retry_attempts=2, retry_base_delay=0.01)  # fmt: skip
    done: list[int] = []

    def progress(n: int) -> None:
        done.append(n)
        if len(done) == 1:
            s3_proxy.down()  # the network dies after the first part

    with pytest.raises(TransientStorageError):
        await first.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal,
                             progress=progress)  # fmt: skip
    await first.close()
    with open(journal) as f:
        assert json.load(f)["part_size"] == S3_MIN_PART
    s3_proxy.up()
    mark = len(s3_proxy.requests)
    second = S3Store(s3_bucket, "runs", part_size=6 * MiB, retry_base_delay=0.01)
    assert second.part_size_for(len(data)) == 6 * MiB  # a fresh upload would use 6 MiB parts
    await second.put_file("r/w.bin", path, size=len(data), crc32c=crc, journal=journal)
    assert second.stats["parts_resumed"] == 1 and second.stats["parts_uploaded"] == 3
    resent = sorted(
        r.split("partNumber=")[1].split("&")[0].split()[0]
        for r in s3_proxy.requests[mark:]
        if "partNumber=" in r and "/runs/r/w.bin?" in r  # not the store's probe uploads
    )
    assert resent == ["2", "3", "4"]  # 5 MiB parts: 4 in all, the first one kept
    assert await second.get_bytes("r/w.bin") == data
    await second.close()


def test_read_ranges_are_one_per_worker_within_bounds() -> None:
    from ckptd.storage.parts import MAX_READ_PART, MIN_READ_PART, read_part_for

    assert read_part_for(512 << 20, 8) == 64 << 20
    assert read_part_for(1 << 20, 8) == MIN_READ_PART
    assert read_part_for(10 << 30, 8) == MAX_READ_PART
    assert read_part_for(0, 8) == MIN_READ_PART
