"""PyTorch's own DCP tests, ported with the storage swapped: each case runs once with DCP's
``FileSystemWriter``/``FileSystemReader`` and once with ``ckptd.dcp.Writer``/``Reader``, and the
two must agree. Ports of ``test/distributed/checkpoint/`` in pytorch/pytorch (around v2.13):
``test_file_system_checkpoint_cpu.py``, ``test_dtensor_resharding.py`` and
``e2e/test_e2e_save_and_load.py``, in our own words, with the same state dicts and assertions.

Cases without a process group run in the test process; the world-2 cases of one upstream file run
in one world of two gloo ranks per storage (``worker.py``), one process group for them all, and
also with ckptd over S3 (a daemon whose store is a moto bucket: parts uploaded, the commit the
store's, reads from S3). Each port's docstring lists what it had to adapt and why.
"""
