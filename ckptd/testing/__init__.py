"""Support shared by ckptd's tests and benchmark (``tests/``, ``bench/``); not part of the API.

It lives in the package so that both can import it from the repo root, and it imports only the
standard library: the servers' own packages (moto, fake-gcs-server) are needed only to start them.
"""
