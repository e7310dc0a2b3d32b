"""Metrics as JSON lines (one object per logged step), appended so resumed runs extend the same file."""

from __future__ import annotations

import json
import os


class JsonlWriter:
  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(path, "a", buffering=1)

  def write(self, record: dict):
    self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

  def close(self):
    self._file.close()


def _plain(value):
  try:
    return value.item()
  except AttributeError:
    return value


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
