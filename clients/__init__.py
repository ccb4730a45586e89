"""Client side: a Python client library (sync and asyncio) and the CLI commands for people."""
