"""Storage tests run against real servers started on loopback (see tests/servers.py)."""

from tests.servers import gcs_bucket, gcs_proxy, gcs_server, s3_bucket, s3_proxy, s3_server

__all__ = ["gcs_bucket", "gcs_proxy", "gcs_server", "s3_bucket", "s3_proxy", "s3_server"]
