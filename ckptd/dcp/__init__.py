"""``torch.distributed.checkpoint`` (DCP) with ckptd as its storage: sharded state, many ranks.

DCP keeps its planning, deduplication of replicated state and resharding; ckptd supplies the
storage path. Each rank's part goes through its node's daemon the way ``Checkpointer.save`` does
(copied into a shared-memory slot, written and uploaded by the daemon), and the checkpoint is
committed once, by the coordinating rank, after every part is confirmed::

    writer = ckptd.dcp.Writer(run="llm", store="s3://bucket/ckpts")
    dcp.async_save(state, checkpoint_id="step-100", storage_writer=writer)   # or dcp.save
    dcp.load(state, checkpoint_id="step-100", storage_reader=ckptd.dcp.Reader(run="llm",
             store="s3://bucket/ckpts"))

Layout of a sharded checkpoint, ``<store>/<run>/checkpoints/<tag>/``:
  ``shard-<rank>-of-<world>.safetensors``  what that rank wrote: tensor chunks under
      ``<fqn>`` (a whole tensor) or ``<fqn>@<offsets>`` (a shard); DCP's non-tensor values
      (``torch.save`` bytes) base64 in ``__metadata__["ckptd.dcp.bytes"]``.
  ``dcp-metadata.json``  DCP's global ``Metadata`` as JSON (DCP's own is a pickle).
  ``MANIFEST.json``      written last, with ``"kind": "dcp"``: the global commit.

Commit rule: a rank's ``write_data`` returns only after its daemon reports the part committed
(the store is the daemon's root) or uploaded (any other store). DCP gathers every rank's results to
the coordinator, which asks its daemon to check that every part is in place and to write the
metadata and the manifest. A rank that fails or dies makes DCP's gather fail, so ``finish`` never
runs and the checkpoint stays invisible. Ranks on several nodes need a store that every daemon
can reach (S3, GCS, a shared path): a part cannot be committed into another node's root.
"""

from __future__ import annotations

from .errors import CheckpointExistsError
from .layout import METADATA, decode_metadata, encode_metadata, shard_name
from .reader import Reader
from .writer import Writer

__all__ = [
    "METADATA",
    "CheckpointExistsError",
    "Reader",
    "Writer",
    "decode_metadata",
    "encode_metadata",
    "shard_name",
]
