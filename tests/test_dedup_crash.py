"""A daemon killed between a reference and its data (issue 15): SIGKILL while a save that
brings a new blob is committed but not uploaded, or while the blob itself is uploading. The
restart on the same root resumes the upload; the store ends with the checkpoint and its blob,
verified; and no manifest in the store ever lists a blob the store does not hold (a watcher
thread checks it all along, and each step checks it again).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import ckptd
from ckptd import Checkpointer
from tests.dedupkit import (
    FROZEN,
    S3View,
    StoreWatch,
    back_to_a_base,
    blobs_of,
    cli_quiet,
    drain,
    hold_proxy,
    local_manifests,
    local_shared,
    peft,
    state_of,
    tag,
    train,
)
from tests.helpers import bitwise_equal, until

_WRITES = ("PutObject", "CreateMultipartUpload", "UploadPart")


@pytest.mark.parametrize("when", ["blob-refused", "mid-blob-upload"])
def test_killed_between_the_reference_and_its_data_resumes_and_never_dangles(
    when: str,
    s3_bucket: str,
    s3_server: str,
    make_daemon: Any,
    fault_log: Any,
    monkeypatch: Any,
) -> None:
    """Step 2 brings a new blob; the daemon is SIGKILLed after step 2 is committed (its
    manifest lists the blob) while the blob is not in the store: its writes refused, or half
    way through its upload."""
    view = S3View(s3_server, s3_bucket, "crash", "k")
    watch = StoreWatch(view)
    try:
        with hold_proxy(s3_server, monkeypatch) as s3_proxy:
            d = make_daemon(store=f"s3://{s3_bucket}/crash", args=["--keep-local", "all"])
            model, opt = peft(0)
            with Checkpointer("k", socket=d.socket) as ckpt:
                ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
                first = view.manifests()[tag(1)]["files"][FROZEN]["blob"]
                assert not view.dangling()

                train(model, opt, 1, seed=2)
                with torch.no_grad():
                    model.base[0].weight.mul_(2)  # step 2 brings a new blob
                expect = state_of(model, opt)
                n0 = len(s3_proxy.calls)
                if when == "blob-refused":
                    s3_proxy.refuse_writes = "/shared/"
                else:
                    s3_proxy.limit_bandwidth(256 << 10)  # the ~1.8 MB blob takes seconds
                ckpt.save(2, model=model, optimizer=opt).wait("committed", 60)
                if when == "blob-refused":
                    until(lambda: s3_proxy.injected["refused_write"] > 0, 60, "a blob upload")
                else:
                    until(
                        lambda: any(
                            c.op in _WRITES and "/shared/" in c.path for c in s3_proxy.calls[n0:]
                        ),
                        30,
                        "the new blob's upload to start",
                    )
            # Committed locally: the new blob and its hard link are in the root.
            local = local_manifests(d.root, "k")
            second = local[tag(2)]["files"][FROZEN]["blob"]
            assert second != first
            shared = local_shared(d.root, "k")
            link = os.stat(os.path.join(d.root, "k", "checkpoints", tag(2), FROZEN))
            assert link.st_ino == shared[f"{second}.safetensors"].st_ino
            d.kill()  # SIGKILL: between the reference (committed) and its data (in the store)

            s3_proxy.refuse_writes = None
            s3_proxy.limit_bandwidth(None)
            assert not view.dangling()
            assert tag(2) not in view.manifests()  # not in the store until its blob is
            d.start()
            with Checkpointer("watch", socket=d.socket) as ckpt:
                drain(ckpt)
    finally:
        checks, violations = watch.stop()
    assert checks > 0 and not violations, violations[:3]

    ms = view.manifests()
    assert sorted(ms) == [tag(1), tag(2)]
    assert ms[tag(2)]["files"][FROZEN]["blob"] == second
    assert not view.dangling()
    assert set(view.shared()) == blobs_of(ms) >= {f"{first}.safetensors", f"{second}.safetensors"}
    assert cli_quiet(["verify", f"{view.url}@{tag(2)}"]) == 0
    assert cli_quiet(["verify", f"{view.url}@{tag(1)}"]) == 0
    state = ckptd.load(view.url, tag=tag(2))
    assert bitwise_equal(state["model"], expect["model"])
    assert bitwise_equal(state["optimizer"], expect["optimizer"])
    assert "upload(s) to resume" in d.log_text()
    # The root after the restart: still one file per blob, the tag dirs' links of them.
    shared = local_shared(d.root, "k")
    assert set(shared) == blobs_of(local_manifests(d.root, "k"))
    for step, blob in ((1, first), (2, second)):
        st = os.stat(os.path.join(d.root, "k", "checkpoints", tag(step), FROZEN))
        assert st.st_ino == shared[f"{blob}.safetensors"].st_ino
    lost = int(tag(2) not in ms)
    fault_log(f"s3: daemon SIGKILLed with a new blob owed ({when})", 1, 2, lost)


def test_a_resumed_upload_does_not_send_a_blob_the_store_has(
    s3_bucket: str, s3_server: str, make_daemon: Any, monkeypatch: Any
) -> None:
    """A save of an unchanged base, killed before its upload: the resumed upload finds the
    blob in the store (same digest, uploaded by step 1) and sends only what is missing."""
    view = S3View(s3_server, s3_bucket, "crash2", "h")
    with hold_proxy(s3_server, monkeypatch) as s3_proxy:
        d = make_daemon(store=f"s3://{s3_bucket}/crash2", args=["--keep-local", "all"])
        model, opt = peft(0)
        with Checkpointer("h", socket=d.socket) as ckpt:
            ckpt.save(1, model=model, optimizer=opt).wait("uploaded", 60)
            blob = view.manifests()[tag(1)]["files"][FROZEN]["blob"]
            train(model, opt, 1, seed=2)
            s3_proxy.refuse_writes = f"/{tag(2)}/"  # step 2's own files cannot go up
            ckpt.save(2, model=model, optimizer=opt).wait("committed", 60)
            until(lambda: s3_proxy.injected["refused_write"] > 0, 60, "step 2's upload")
        d.kill()
        s3_proxy.refuse_writes = None
        n0 = len(s3_proxy.calls)
        d.start()
        with Checkpointer("watch", socket=d.socket) as ckpt:
            drain(ckpt)
        sent = [c for c in s3_proxy.calls[n0:] if c.op in _WRITES and "/shared/" in c.path]
        # The restarted daemon knows the run's blobs from its root: a new save links the one
        # blob file, and uploads nothing of it either.
        n1 = len(s3_proxy.calls)
        with Checkpointer("h", socket=d.socket) as ckpt:
            train(model, opt, 1, seed=3)
            ckpt.save(3, model=model, optimizer=opt).wait("uploaded", 60)
        sent += [c for c in s3_proxy.calls[n1:] if c.op in _WRITES and "/shared/" in c.path]
    shared = local_shared(d.root, "h")
    assert set(shared) == {f"{blob}.safetensors"}
    for step in (1, 2, 3):
        st = os.stat(os.path.join(d.root, "h", "checkpoints", tag(step), FROZEN))
        assert st.st_ino == shared[f"{blob}.safetensors"].st_ino, step
    ms = view.manifests()
    assert sorted(ms) == [tag(1), tag(2), tag(3)]
    assert ms[tag(2)]["files"][FROZEN]["blob"] == blob  # the unchanged base: the same blob
    assert ms[tag(3)]["files"][FROZEN]["blob"] == blob
    assert set(view.shared()) == {f"{blob}.safetensors"}
    assert not sent, sent
    assert cli_quiet(["verify", f"{view.url}@{tag(2)}"]) == 0


def test_killed_after_a_manifest_whose_blob_a_gc_took_heals_on_restart(
    s3_bucket: str, s3_server: str, make_daemon: Any, monkeypatch: Any
) -> None:
    """The narrowest window: step 3's manifest is in the store, listing blob A that a gc
    elsewhere deleted just before; the daemon cannot put A back, and is SIGKILLed. The restart
    on the same root must put A back: the store ends with step 3 whole."""
    view = S3View(s3_server, s3_bucket, "heal", "rr")
    with hold_proxy(s3_server, monkeypatch) as proxy:
        d = make_daemon(store=f"s3://{s3_bucket}/heal", args=["--keep-local", "all"])
        with Checkpointer("rr", socket=d.socket) as ckpt:
            a, _, expect = back_to_a_base(view, proxy, d, ckpt, "rr")
            with monkeypatch.context() as m:
                m.setenv("AWS_ENDPOINT_URL", s3_server)
                assert cli_quiet(["gc", view.url, "--keep-last", "1", "--blob-grace", "0"]) == 0
            proxy.refuse_writes = "/shared/"  # the manifest goes up, A cannot
            proxy.release()
            until(lambda: tag(3) in view.dangling(), 30, "step 3's manifest, its blob missing")
        d.kill()
        proxy.refuse_writes = None
        d.start()
        with Checkpointer("watch", socket=d.socket) as ckpt:
            drain(ckpt)
    until(lambda: not view.dangling(), 30, "the restarted daemon to put the blob back")
    assert f"{a}.safetensors" in view.shared()
    assert cli_quiet(["verify", f"{view.url}@{tag(3)}"]) == 0
    assert bitwise_equal(ckptd.load(view.url, tag=tag(3))["model"], expect["model"])
