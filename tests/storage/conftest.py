"""Storage tests run against real servers started on loopback (fixtures in tests/conftest.py)."""
