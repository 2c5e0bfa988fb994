"""Keeps library chatter (Orbax's per-save INFO lines, backend probing) off the console."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

_CHATTY = ("/orbax/", "/jax/_src/xla_bridge.py", "/grain/")


class _LibraryInfoFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def quiet_library_logs() -> None:
  """Drops INFO records of chatty libraries from absl's handler (warnings still show)."""
  absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
