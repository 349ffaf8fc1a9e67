#!/bin/bash
# Slurm Epilog= for nodes that run ckptd as a system service (systemd/ckptd.service): hold the
# node until the job's checkpoints are in the store. Walkthrough: docs/slurm.md.
# slurm.conf:  Epilog=/etc/slurm/epilog.d/ckptd-drain.sh   PrologEpilogTimeout=300
# An epilog that exits non-zero drains the node in Slurm's sense (no new jobs), so a failed drain
# is logged and the script still exits 0; the daemon keeps uploading while it runs.
SOCKET=/run/ckptd/ckptd.sock
TIMEOUT=240  # below PrologEpilogTimeout

[ -S "$SOCKET" ] || exit 0  # no daemon on this node
if ! runuser -u ckptd -- ckptd drain --socket "$SOCKET" --timeout "$TIMEOUT"; then
    logger -t ckptd-epilog "job ${SLURM_JOB_ID:-?}: checkpoints still pending after ${TIMEOUT} s; see: ckptd status --socket $SOCKET"
fi
exit 0
