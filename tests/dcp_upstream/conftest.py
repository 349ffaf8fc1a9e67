"""One daemon per ported module, and each module's world of ranks run once per storage."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ckptd.testing.servers import bucket_name
from tests.conftest import DaemonHandle
from tests.servers import set_s3_env

from .harness import BACKENDS, SEED, Storage, run_world, tail


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*process group.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def upstream_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    tmp = tmp_path_factory.mktemp("daemon")
    short = tempfile.mkdtemp(prefix="ckptd-u-", dir="/tmp")  # AF_UNIX paths stay short
    handle = DaemonHandle(str(tmp / "root"), os.path.join(short, "d.sock"), str(tmp / "d.log"),
                          None, [])  # fmt: skip
    yield handle
    handle.kill()
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def upstream_s3_daemon(
    s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonHandle]:
    """A daemon whose store is a fresh bucket on the moto server: parts are uploaded, the commit
    is the store's, and readers read from S3."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        set_s3_env(mp, s3_server)
        bucket = bucket_name()
        client = boto3.client("s3", endpoint_url=s3_server)
        client.create_bucket(Bucket=bucket)
        client.close()
        tmp = tmp_path_factory.mktemp("s3-daemon")
        short = tempfile.mkdtemp(prefix="ckptd-u-", dir="/tmp")
        handle = DaemonHandle(str(tmp / "root"), os.path.join(short, "s3.sock"),
                              str(tmp / "s3.log"), f"s3://{bucket}/ckpts", [])  # fmt: skip
        yield handle
        handle.kill()
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Storage]:
    """A single-process case's storage: a fresh directory, or the module's daemon."""
    if request.param == "ckptd":
        d = request.getfixturevalue("upstream_daemon")
        run = re.sub(r"[^A-Za-z0-9._=+-]", "-", request.node.name)[:100]
        st = Storage("ckptd", str(tmp_path), socket=d.socket, run=run)
    else:
        st = Storage("fs", str(tmp_path))
    yield st
    st.close()


@pytest.fixture(scope="module")
def world2(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], dict[str, Any]]:
    """``world2(kind, case)``: that case's verdict from the module's world run with ``kind``
    (each world runs once, the first time one of its cases is asked for)."""
    module = request.module
    runs: dict[str, tuple[dict[str, Any], str]] = {}

    def verdict(kind: str, case: str) -> dict[str, Any]:
        if kind not in runs:
            tmp = str(tmp_path_factory.mktemp(f"world-{kind}"))
            daemon = {"ckptd": "upstream_daemon", "ckptd-s3": "upstream_s3_daemon"}.get(kind)
            socket = request.getfixturevalue(daemon).socket if daemon else ""
            cases = [name for name, _, _ in module.WORLD2]
            runs[kind] = (run_world(module.__name__, kind, 2, tmp, socket, cases), tmp)
        results, tmp = runs[kind]
        v = results.get(case)
        if v is None or not v["complete"]:
            logs = "\n".join(
                tail(os.path.join(tmp, f"out-{kind}", f"rank-{r}.log")) for r in (0, 1)
            )
            pytest.fail(f"the world died before {case} finished on every rank:\n{logs}")
        return v

    return verdict
