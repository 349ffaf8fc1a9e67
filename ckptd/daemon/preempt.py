"""Spot/preemption notices from the cloud's metadata service, watched as one asyncio task.

AWS gives a 2-minute notice through IMDSv2 (``spot/instance-action``: 404 until the notice, then 200
with ``{"action": ..., "time": ...}``); GCE sets ``instance/preempted`` to ``TRUE`` about 30 s
before the hard stop, which a hanging GET (``wait_for_change=true``) sees at once. Either way
``on_notice(source, detail)`` is called once and the watcher ends. A watcher never raises into the
daemon: errors are logged and retried with backoff, because a broken metadata service must not
take the checkpoint daemon down with it.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from ..errors import ConfigError

log = logging.getLogger("ckptd.preempt")

OnNotice = Callable[[str, str], Awaitable[None] | None]
"""``on_notice(source, detail)``: source is ``"aws"`` or ``"gce"``; may be sync or async."""

_AWS_TOKEN_PATH = "/latest/api/token"
_AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
_GCE_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
_GCE_HEADERS = {"Metadata-Flavor": "Google"}
_AWS_MAX_TTL = 21600  # IMDSv2 refuses longer token lifetimes
_DEFAULT_AWS = "http://169.254.169.254"
_DEFAULT_GCE = "http://metadata.google.internal"


class PreemptionMode(enum.StrEnum):
    OFF = "off"  # watch nothing
    AUTO = "auto"  # probe both metadata services at start; watch the one that answers
    AWS = "aws"  # IMDSv2 spot/instance-action
    GCE = "gce"  # GCE metadata instance/preempted


@dataclass(kw_only=True, slots=True)
class PreemptionConfig:
    mode: PreemptionMode | str = PreemptionMode.AUTO
    """off, auto, aws or gce. "auto" reads DMI to tell the cloud, confirms with one bounded probe
    of that cloud's metadata service, and watches nothing elsewhere (a laptop, an on-prem node)."""
    aws_endpoint: str = _DEFAULT_AWS
    """IMDS base URL; tests point it at a local server."""
    gce_endpoint: str = _DEFAULT_GCE
    """GCE metadata server base URL."""
    poll_interval: float = 5.0
    """Seconds between IMDS polls: AWS gives 2 minutes' notice, so a few seconds is plenty."""
    token_ttl: int = _AWS_MAX_TTL
    """IMDSv2 token lifetime in seconds; the token is renewed before it runs out."""
    request_timeout: float = 2.0
    """Bound on each ordinary metadata request: the service is link-local and answers in ms."""
    probe_timeout: float = 1.0
    """Bound on each "auto" probe; off-cloud the address may swallow packets silently."""
    gce_wait_timeout: int = 60
    """Seconds the GCE server may hold a hanging GET before answering with the unchanged value."""
    max_backoff: float = 30.0
    """Longest wait between retries after errors; keeps a flaky service from being hammered."""

    def __post_init__(self) -> None:
        try:
            self.mode = PreemptionMode(self.mode)
        except ValueError:
            choices = ", ".join(m.value for m in PreemptionMode)
            raise ConfigError(
                f"preemption mode must be one of {choices}, not {self.mode!r}"
            ) from None
        if not 0 < self.poll_interval <= 30:
            raise ConfigError(
                "poll_interval must be in (0, 30] s: AWS gives only 2 minutes' notice"
            )
        if not 1 <= self.token_ttl <= _AWS_MAX_TTL:
            raise ConfigError(f"token_ttl must be in [1, {_AWS_MAX_TTL}] s (IMDSv2's range)")
        if self.request_timeout <= 0 or self.probe_timeout <= 0 or self.max_backoff <= 0:
            raise ConfigError("timeouts and max_backoff must be positive: requests must be bounded")
        if self.gce_wait_timeout < 1:
            raise ConfigError("gce_wait_timeout must be at least 1 s")
        for name in ("aws_endpoint", "gce_endpoint"):
            url = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http(s) URL, not {url!r}")
            setattr(self, name, url.rstrip("/"))


async def watch_preemption(cfg: PreemptionConfig, on_notice: OnNotice) -> None:
    """Watch for a preemption notice per ``cfg`` and call ``on_notice`` once; the daemon's task.

    Returns at once for "off" (and for "auto" when no metadata service answers); otherwise runs
    until the notice (or until cancelled). Never raises except ``CancelledError``.
    """
    if cfg.mode == PreemptionMode.OFF:
        return
    # trust_env=False: an HTTP(S)_PROXY meant for the store must not swallow link-local requests.
    async with aiohttp.ClientSession(trust_env=False) as session:
        try:
            mode = cfg.mode
            if mode == PreemptionMode.AUTO:
                mode = await detect(cfg, session)
                if mode == PreemptionMode.OFF:
                    log.info("no cloud metadata service answered: not watching for preemption")
                    return
            if mode == PreemptionMode.AWS:
                log.info("watching AWS spot notices at %s", cfg.aws_endpoint)
                source, detail = await _watch_aws(cfg, session)
            else:
                log.info("watching GCE preemption at %s", cfg.gce_endpoint)
                source, detail = await _watch_gce(cfg, session)
        except Exception:  # a bug here must never stop the daemon
            log.exception("preemption watcher failed; no longer watching")
            return
    log.warning("preemption notice from %s: %s", source, detail)
    try:
        result = on_notice(source, detail)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("preemption callback failed")


def platform_hint(dmi_dir: str = "/sys/class/dmi/id") -> PreemptionMode | None:
    """Which cloud the machine says it is (DMI, as cloud-init reads it), without any network."""
    text = []
    for name in ("sys_vendor", "product_name", "bios_vendor", "product_version"):
        try:
            with open(f"{dmi_dir}/{name}") as f:
                text.append(f.read().strip().lower())
        except OSError:
            continue
    joined = " ".join(text)
    if "amazon" in joined:
        return PreemptionMode.AWS
    if "google" in joined:
        return PreemptionMode.GCE
    return None


async def detect(cfg: PreemptionConfig, session: aiohttp.ClientSession) -> PreemptionMode:
    """Probe the metadata service(s) this machine may have; OFF when none answers.

    A default (link-local) endpoint is only probed when DMI says the machine is on that cloud,
    so a laptop or an on-prem node sends nothing to metadata addresses. A configured endpoint is
    always probed.
    """
    hint = platform_hint()
    want_aws = hint == PreemptionMode.AWS or cfg.aws_endpoint != _DEFAULT_AWS
    want_gce = hint == PreemptionMode.GCE or cfg.gce_endpoint != _DEFAULT_GCE

    async def no() -> bool:
        return False

    aws, gce = await asyncio.gather(
        _probe_aws(cfg, session) if want_aws else no(),
        _probe_gce(cfg, session) if want_gce else no(),
    )
    if aws:
        return PreemptionMode.AWS
    if gce:
        return PreemptionMode.GCE
    return PreemptionMode.OFF


async def _probe_aws(cfg: PreemptionConfig, session: aiohttp.ClientSession) -> bool:
    try:
        await _aws_token(cfg, session, timeout=cfg.probe_timeout)
    except (aiohttp.ClientError, TimeoutError, OSError, _MetadataError) as e:
        log.debug("AWS metadata probe: %s", e)
        return False
    return True


async def _probe_gce(cfg: PreemptionConfig, session: aiohttp.ClientSession) -> bool:
    # The response header, not the status, identifies GCE: other servers may answer 200 to anything.
    try:
        async with session.get(
            f"{cfg.gce_endpoint}/computeMetadata/v1/",
            headers=_GCE_HEADERS,
            timeout=aiohttp.ClientTimeout(total=cfg.probe_timeout),
            allow_redirects=False,
        ) as resp:
            return resp.headers.get("Metadata-Flavor") == "Google"
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        log.debug("GCE metadata probe: %s", e)
        return False


class _MetadataError(Exception):
    """An unexpected answer from a metadata service (retried with backoff)."""


class _Backoff:
    """Exponential backoff with full jitter; logs the first failure loudly, repeats quietly."""

    def __init__(self, what: str, max_delay: float) -> None:
        self.what = what
        self.max_delay = max_delay
        self.failures = 0

    async def failed(self, exc: BaseException) -> None:
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        log.log(level, "%s failed (%d in a row): %s; retrying", self.what, self.failures, exc)
        delay = min(self.max_delay, 0.5 * 2 ** min(self.failures, 10))
        await asyncio.sleep(random.uniform(delay / 2, delay))

    def ok(self) -> None:
        if self.failures:
            log.info("%s works again after %d failure(s)", self.what, self.failures)
        self.failures = 0


async def _aws_token(
    cfg: PreemptionConfig, session: aiohttp.ClientSession, *, timeout: float
) -> str:
    async with session.put(
        f"{cfg.aws_endpoint}{_AWS_TOKEN_PATH}",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(cfg.token_ttl)},
        timeout=aiohttp.ClientTimeout(total=timeout),
        allow_redirects=False,
    ) as resp:
        if resp.status != 200:
            raise _MetadataError(f"IMDSv2 token request answered {resp.status}")
        token = (await resp.text()).strip()
    if not token:
        raise _MetadataError("IMDSv2 token request answered an empty token")
    return token


async def _watch_aws(cfg: PreemptionConfig, session: aiohttp.ClientSession) -> tuple[str, str]:
    token: str | None = None
    expires = 0.0
    # Renew well before expiry, so that a poll never carries a token about to lapse.
    margin = min(60.0, cfg.token_ttl / 4)
    backoff = _Backoff("AWS spot notice poll", cfg.max_backoff)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
    while True:
        fresh = False
        try:
            if token is None or time.monotonic() >= expires:
                obtained = time.monotonic()
                token = await _aws_token(cfg, session, timeout=cfg.request_timeout)
                expires = obtained + cfg.token_ttl - margin
                fresh = True
            async with session.get(
                f"{cfg.aws_endpoint}{_AWS_ACTION_PATH}",
                headers={"X-aws-ec2-metadata-token": token},
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.text() if status == 200 else ""
            if status == 200:
                return "aws", _aws_detail(body)
            if status == 401:
                token = None
                if not fresh:  # an expired or revoked token is routine: renew it at once
                    log.info("IMDS refused the token (401); renewing it")
                    continue
                raise _MetadataError("IMDS refused a token it had just issued (401)")
            if status != 404:  # 404 is the normal "no notice" answer
                raise _MetadataError(f"spot/instance-action answered {status}")
            backoff.ok()
        except (aiohttp.ClientError, TimeoutError, OSError, _MetadataError) as e:
            await backoff.failed(e)
            continue
        await asyncio.sleep(cfg.poll_interval)


def _aws_detail(body: str) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.strip()[:200] or "instance-action"
    if isinstance(doc, dict):
        return f"{doc.get('action', '?')} at {doc.get('time', '?')}"
    return str(doc)[:200]


async def _watch_gce(cfg: PreemptionConfig, session: aiohttp.ClientSession) -> tuple[str, str]:
    url = f"{cfg.gce_endpoint}{_GCE_PREEMPTED_PATH}"
    backoff = _Backoff("GCE preemption watch", cfg.max_backoff)
    etag: str | None = None
    first = True
    while True:
        if first:  # a plain read first: the notice may already be there
            params: dict[str, str] = {}
            timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
        else:
            params = {"wait_for_change": "true", "timeout_sec": str(cfg.gce_wait_timeout)}
            if etag:  # returns at once if the value changed since the last answer
                params["last_etag"] = etag
            timeout = aiohttp.ClientTimeout(
                total=cfg.gce_wait_timeout + cfg.request_timeout + 5,
                sock_connect=cfg.request_timeout,
            )
        started = time.monotonic()
        try:
            async with session.get(
                url, params=params, headers=_GCE_HEADERS, timeout=timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise _MetadataError(f"instance/preempted answered {resp.status}")
                value = (await resp.text()).strip().upper()
                etag = resp.headers.get("ETag") or etag
        except (aiohttp.ClientError, TimeoutError, OSError, _MetadataError) as e:
            await backoff.failed(e)
            continue
        backoff.ok()
        waited = not first
        first = False
        if value == "TRUE":
            return "gce", "instance/preempted is TRUE"
        if value != "FALSE":
            log.warning("unexpected instance/preempted value %r; watching on", value[:50])
        if value != "FALSE" or (waited and time.monotonic() - started < 1.0):
            await asyncio.sleep(cfg.poll_interval)  # never spin on a server that does not hang


__all__ = ["OnNotice", "PreemptionConfig", "PreemptionMode", "detect", "watch_preemption"]
