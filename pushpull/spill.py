"""The spill file: where a receiver's cold stop saves the messages it received but
did not process, for its next start to process first. This module is its only reader
and writer.

Format: SPILL_MAGIC, then per message its raw frame's length (4 bytes, big-endian)
and the frame.
"""

import os

from pushpull import wire

SPILL_MAGIC = b"ZPPSPILL1\n"  # first bytes of a spill file
LENGTH_SIZE = 4  # bytes of each frame's length prefix


class SpillError(Exception):
    """The spill file exists but cannot be read."""


def load(path):
    """The messages a cold stop saved to `path`, decoded, and how many frames did not
    decode; ([], 0) when there is no spill file. Raises SpillError."""
    messages, invalid, run_cache = [], 0, {}
    for frame in _read_frames(path):
        try:
            messages.append(wire.decode(frame, run_cache))
        except wire.InvalidMessage:
            invalid += 1
    return messages, invalid


def _read_frames(path):
    try:
        with open(path, "rb") as spill:
            data = spill.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SpillError(f"cannot read spill file {path}: {exc.strerror}") from None
    if not data.startswith(SPILL_MAGIC):
        raise SpillError(f"spill file {path} is not a spill file (kept as it is)")
    frames, pos = [], len(SPILL_MAGIC)
    while pos < len(data):
        end = pos + LENGTH_SIZE
        size = int.from_bytes(data[pos:end], "big")
        if end > len(data) or end + size > len(data):
            raise SpillError(f"spill file {path} is truncated (kept as it is)")
        frames.append(data[end:end + size])
        pos = end + size
    return frames


def save(path, messages):
    """Save messages (their raw frames) to `path`, atomically (via a temporary file);
    raises OSError."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as spill:
        spill.write(SPILL_MAGIC)
        for msg in messages:
            frame = msg[wire.RAW]
            spill.write(len(frame).to_bytes(LENGTH_SIZE, "big"))
            spill.write(frame)
    os.replace(temporary, path)


def remove(path):
    """Delete the spill file once its frames are processed; False if there was none.

    Raises OSError when it exists but cannot be removed.
    """
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True
