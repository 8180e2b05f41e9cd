"""TEST/DEV ONLY: the local stack (real control plane, S3, PostgreSQL) and the process node.

Nothing in Nightjar the product imports this package; ``make up``, ``make down`` and the test
suite do, through ``python -m nightjar.devstack``.
"""
