"""Preemption watchers against a local server that plays the AWS IMDSv2 and GCE metadata services."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from ckptd.daemon.preempt import PreemptionConfig, PreemptionMode, detect, watch_preemption
from ckptd.errors import ConfigError
from ckptd.testing.servers import free_port

BOUND_S = 10.0


class FakeMetadata:
    """Plays IMDSv2 (tokens with TTLs, 404 then 200 on spot/instance-action) and GCE metadata."""

    def __init__(self, *, aws: bool = True, gce: bool = True) -> None:
        self.aws, self.gce = aws, gce
        self.requests = 0
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.token_ttls: list[str] = []  # the TTL header of each PUT
        self.action_tokens: list[str] = []  # the token sent with each instance-action GET
        self.unauthorized = 0
        self.action_errors = 0  # answer this many instance-action GETs with 500 first
        self.aws_notice = False
        self.gce_plain = 0
        self.gce_waits = 0  # hanging GETs received
        self.preempted = asyncio.Event()
        self._ids = itertools.count(1)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self._action)
        app.router.add_get("/computeMetadata/v1/", self._gce_root)
        app.router.add_get("/computeMetadata/v1/instance/preempted", self._gce_preempted)
        app.middlewares.append(self._count)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Callable) -> web.StreamResponse:  # type: ignore[type-arg]
        self.requests += 1
        return await handler(request)

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    async def _token(self, request: web.Request) -> web.Response:
        if not self.aws:
            raise web.HTTPNotFound()
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        if ttl is None:
            raise web.HTTPBadRequest()
        self.token_ttls.append(ttl)
        token = f"tok-{next(self._ids)}"
        self.tokens[token] = time.monotonic() + int(ttl)
        return web.Response(text=token)

    async def _action(self, request: web.Request) -> web.Response:
        if not self.aws:
            raise web.HTTPNotFound()
        token = request.headers.get("X-aws-ec2-metadata-token", "")
        self.action_tokens.append(token)
        if self.tokens.get(token, 0.0) < time.monotonic():
            self.unauthorized += 1
            raise web.HTTPUnauthorized()
        if self.action_errors > 0:
            self.action_errors -= 1
            raise web.HTTPInternalServerError()
        if not self.aws_notice:
            raise web.HTTPNotFound()
        return web.json_response({"action": "terminate", "time": "2030-01-02T03:04:05Z"})

    def _gce_check(self, request: web.Request) -> None:
        if not self.gce:
            raise web.HTTPNotFound()
        if request.headers.get("Metadata-Flavor") != "Google":
            raise web.HTTPForbidden()

    async def _gce_root(self, request: web.Request) -> web.Response:
        self._gce_check(request)
        return web.Response(text="instance/\n", headers={"Metadata-Flavor": "Google"})

    async def _gce_preempted(self, request: web.Request) -> web.Response:
        self._gce_check(request)
        if request.query.get("wait_for_change") == "true":
            self.gce_waits += 1
            timeout = float(request.query.get("timeout_sec", "60"))
            # GCE answers with the unchanged value when the wait runs out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.preempted.wait(), timeout)
        else:
            self.gce_plain += 1
        value = "TRUE" if self.preempted.is_set() else "FALSE"
        return web.Response(text=value, headers={"Metadata-Flavor": "Google", "ETag": value})


@pytest.fixture
async def md() -> AsyncIterator[FakeMetadata]:
    server = FakeMetadata()
    await server.start()
    yield server
    await server.close()


async def until(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond`` with a bound; for synchronizing with the server, never a fixed sleep."""
    deadline = time.monotonic() + BOUND_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def config(md: FakeMetadata, mode: str, **kw: object) -> PreemptionConfig:
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("max_backoff", 0.05)
    return PreemptionConfig(mode=mode, aws_endpoint=md.url, gce_endpoint=md.url, **kw)  # type: ignore[arg-type]


class Notices:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, source: str, detail: str) -> None:
        self.calls.append((source, detail))


async def test_aws_notice_fires_once_with_token(md: FakeMetadata) -> None:
    notices = Notices()
    task = asyncio.create_task(watch_preemption(config(md, "aws"), notices))
    await until(lambda: len(md.action_tokens) >= 3, "a few polls")
    assert not notices.calls and not task.done()  # 404: no notice
    md.aws_notice = True
    await asyncio.wait_for(task, BOUND_S)
    assert notices.calls == [("aws", "terminate at 2030-01-02T03:04:05Z")]
    assert md.token_ttls == ["21600"]  # one token, reused by every poll
    assert set(md.action_tokens) == {"tok-1"} and md.unauthorized == 0


async def test_aws_token_renewed_before_ttl_and_after_401(md: FakeMetadata) -> None:
    notices = Notices()
    task = asyncio.create_task(watch_preemption(config(md, "aws", token_ttl=1), notices))
    await until(lambda: len(md.token_ttls) >= 2, "a renewed token")
    assert md.token_ttls[:2] == ["1", "1"]
    assert md.unauthorized == 0  # renewed before it ran out, not after a refusal
    md.revoke_tokens()
    puts = len(md.token_ttls)
    await until(lambda: md.unauthorized >= 1 and len(md.token_ttls) > puts, "renewal after 401")
    await until(lambda: md.action_tokens[-1] == f"tok-{len(md.token_ttls)}", "a poll with it")
    md.aws_notice = True
    await asyncio.wait_for(task, BOUND_S)
    assert [c[0] for c in notices.calls] == ["aws"]


async def test_aws_server_errors_back_off_and_recover(md: FakeMetadata) -> None:
    md.action_errors = 3
    notices = Notices()
    task = asyncio.create_task(watch_preemption(config(md, "aws"), notices))
    await until(lambda: md.action_errors == 0, "the errors to be served")
    md.aws_notice = True
    await asyncio.wait_for(task, BOUND_S)
    assert [c[0] for c in notices.calls] == ["aws"]


async def test_gce_hanging_get_fires_on_true(md: FakeMetadata) -> None:
    notices = Notices()
    cfg = config(md, "gce", gce_wait_timeout=1)
    task = asyncio.create_task(watch_preemption(cfg, notices))
    await until(lambda: md.gce_waits >= 2, "a second hanging GET after FALSE")
    assert md.gce_plain == 1  # checked once without waiting first
    assert not notices.calls
    md.preempted.set()
    await asyncio.wait_for(task, BOUND_S)
    assert notices.calls == [("gce", "instance/preempted is TRUE")]


async def test_gce_already_preempted_fires_without_waiting(md: FakeMetadata) -> None:
    md.preempted.set()
    notices = Notices()
    await asyncio.wait_for(watch_preemption(config(md, "gce"), notices), BOUND_S)
    assert notices.calls == [("gce", "instance/preempted is TRUE")]
    assert md.gce_waits == 0


def sync_notices() -> tuple[list[tuple[str, str]], Callable[[str, str], None]]:
    calls: list[tuple[str, str]] = []
    return calls, lambda source, detail: calls.append((source, detail))


@pytest.mark.parametrize("cloud", ["aws", "gce"])
async def test_auto_detects_each_cloud(cloud: str) -> None:
    md = FakeMetadata(aws=cloud == "aws", gce=cloud == "gce")
    await md.start()
    try:
        async with aiohttp.ClientSession() as session:
            assert await detect(config(md, "auto"), session) == PreemptionMode(cloud)
        md.aws_notice = True
        md.preempted.set()
        calls, on_notice = sync_notices()  # a plain function works as the callback too
        await asyncio.wait_for(watch_preemption(config(md, "auto"), on_notice), BOUND_S)
        assert [c[0] for c in calls] == [cloud]
    finally:
        await md.close()


async def test_auto_without_metadata_service_watches_nothing() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    cfg = PreemptionConfig(mode="auto", aws_endpoint=closed, gce_endpoint=closed, probe_timeout=2)
    calls, on_notice = sync_notices()
    await asyncio.wait_for(watch_preemption(cfg, on_notice), BOUND_S)
    assert calls == []


async def test_off_starts_nothing(md: FakeMetadata) -> None:
    md.aws_notice = True
    md.preempted.set()
    calls, on_notice = sync_notices()
    await asyncio.wait_for(watch_preemption(config(md, "off"), on_notice), 1.0)
    assert calls == [] and md.requests == 0


async def test_callback_failure_does_not_escape(md: FakeMetadata) -> None:
    md.aws_notice = True

    def broken(source: str, detail: str) -> None:
        raise RuntimeError("boom")

    await asyncio.wait_for(watch_preemption(config(md, "aws"), broken), BOUND_S)


def test_config_refuses_unknown_values() -> None:
    with pytest.raises(ConfigError, match="off, auto, aws, gce"):
        PreemptionConfig(mode="azure")
    with pytest.raises(ConfigError, match="2 minutes"):
        PreemptionConfig(poll_interval=300)
    with pytest.raises(ConfigError, match="http"):
        PreemptionConfig(aws_endpoint="169.254.169.254")
    cfg = PreemptionConfig(mode="GCE".lower(), gce_endpoint="http://x/")
    assert cfg.mode is PreemptionMode.GCE and cfg.gce_endpoint == "http://x"
