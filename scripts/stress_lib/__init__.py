"""Package-private parts of scripts/stress.py: request bodies, the bad-input corpus, raw-pyzmq
client drivers, the per-request ledger, process control and fault injection, the report.

Nothing here imports the project's client library or parser: the stress run talks to the broker
the way a foreign client would, through the wire contract (CONTRACT.md) only.
"""
