"""The fault-injection run (``python -m nightjar.devstack chaos``, ``make chaos``). TEST/DEV ONLY.

``plan`` (the seeded schedule, the report) and ``invariants`` (the checks) are pure and unit-tested;
``workload`` drives Backups, Restores and expiries, ``faults`` breaks and mends the stack, ``run``
puts them together against a running local stack.
"""
