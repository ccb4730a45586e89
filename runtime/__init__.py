"""What every sdxl-broker process needs to start, importable from broker/, gpu_worker/ and
clients/ alike: the one settings table (`runtime.settings`), logging set-up (`runtime.logs`) and
the CURVE key helpers (`runtime.curve`). No torch, no broker or worker code; zmq only inside
the CURVE functions that need it."""
