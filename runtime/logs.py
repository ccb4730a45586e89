"""Log set-up shared by serve, broker and worker: the same text or JSON lines from every process.

- One handler on the root logger: `text` lines, or with `json` one JSON object per line
  (`ts, level, logger, pid, message`, plus `exc` for a traceback and `job` for a finished job).
- Python warnings go through logging (logger `py.warnings`), once, like everything else.
- Third-party messages that tell an operator nothing are dropped (NOISE below: diffusers' "No
  LoRA keys associated to CLIPTextModel" for every LoRA that has no text-encoder part, "should
  be kept in float32: []" on every model load, transformers' "requires torchvision" on every
  worker start, peft's "Already found a `peft_config`" for every second LoRA of a job, which
  several LoRAs at once always are); the rest of diffusers' and transformers' logging is routed through this
  handler instead of their own (`route_library_logs`, called before they are imported).
- With `json`, every line this process writes to stderr is JSON, also what does not come
  through logging (a print, a C library's message, a child process that inherited stderr):
  fd 2 is a pipe read by one thread, which passes JSON lines through and wraps any other
  line as a record of logger `stderr`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import warnings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# substrings of third-party messages an operator can do nothing about (see the module docstring)
NOISE = (
    "No LoRA keys associated to",
    "that should be kept in float32: []",
    "requires torchvision (not installed)",
    "Already found a `peft_config` attribute in the model",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "message": record.getMessage()}
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            entry["job"] = job
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class QuietFilter(logging.Filter):
    """Drops the NOISE messages, whichever logger they come through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:   # a broken third-party format string: keep the record
            return True
        return not any(noise in message for noise in NOISE)


def configure_logging(level: str, fmt: str) -> None:
    """One stderr handler on the root logger: `text` lines or one JSON object per line."""
    stream = sys.stderr
    if fmt == "json":
        stream = _stderr_as_json_lines() or stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(QuietFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = str(level).upper()
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    logging.captureWarnings(True)
    for noise in NOISE:
        warnings.filterwarnings("ignore", message=f".*{_regex(noise)}")


def route_library_logs() -> None:
    """diffusers and transformers log through their own stderr handler, in their own format;
    make them propagate to ours instead (one format, the NOISE filter, JSON). Call it before
    they are imported for real (it imports only their logging modules), so messages printed
    while importing them are routed too."""
    for module_name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            module = __import__(module_name, fromlist=["_"])
        except Exception:   # not installed: nothing to route
            continue
        module.disable_default_handler()
        module.enable_propagation()
        module.set_verbosity_warning()


def _regex(text: str) -> str:
    import re

    return re.escape(text)


# --- every stderr line as JSON --------------------------------------------------------------
_capture: dict = {}


def _stderr_as_json_lines():
    """Point fd 2 (and sys.stderr) at a pipe whose lines one thread turns into JSON records;
    returns the stream the log handler should write to (the real stderr), or None when fd 2
    is not this process's own (under a test runner's capture), where nothing is changed."""
    if _capture:
        return _capture["real"]
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return None
    except (AttributeError, OSError, ValueError):   # a replaced sys.stderr without a real fd
        return None
    sys.stderr.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    reader = threading.Thread(target=_wrap_lines, args=(read_fd, real), name="stderr-as-json",
                              daemon=True)
    reader.start()
    _capture.update(real=real, reader=reader)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value,
                                                      args.exc_traceback)
    atexit.register(_finish_capture)
    return real


def _wrap_lines(read_fd: int, real) -> None:
    log = logging.getLogger("stderr")
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.startswith("{") and _is_json(text):   # a child's own JSON line
                handler = logging.getLogger().handlers[0]
                with handler.lock:   # never interleaved with a line of our own
                    real.write(text + "\n")
            elif not any(noise in text for noise in NOISE):
                log.warning("%s", text)


def _is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    logging.getLogger("uncaught").critical("uncaught %s", exc_type.__name__,
                                           exc_info=(exc_type, exc_value, exc_traceback))


def _finish_capture() -> None:
    """At exit: let the reader turn what is still in the pipe into lines before we go."""
    try:
        sys.stderr.flush()
        os.dup2(_capture["real"].fileno(), 2)   # closes our write end of the pipe
    except (OSError, ValueError):
        return
    _capture["reader"].join(timeout=2.0)
