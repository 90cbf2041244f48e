"""Ray tests: the session's local cluster is the ``ray_cluster`` fixture of tests/conftest.py."""

NUM_WORKERS = 2
