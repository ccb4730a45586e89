"""One worker process per device: transport (socket + heartbeat thread), an executor that
runs canonical jobs (diffusers, or the named simulation), pipeline cache and telemetry."""
