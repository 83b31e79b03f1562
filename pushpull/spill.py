"""The spill file: where a receiver saves the messages it received but did not process
(a cold stop's backlog; what a warm stop drained beyond the queue's bound), for its
next start to process first. This module is its only reader and writer.

Format 2: SPILL_MAGIC; per message a record: its raw frame's length and the CRC-32
of the frame (RECORD), then the frame; last a trailer: END_MARK where a length would
be, the number of frames and the CRC-32 of that number (TRAILER). A file cut short,
even at a frame boundary, has no trailer; a changed byte fails a CRC.
A format 1 file (SPILL_MAGIC_1) holds frames of wire format 1, which this version
cannot decode: it is refused, and kept.

While a receiver owns a spill file it holds PATH.lock, locked by the operating system
(released even when the process is killed): a second receiver refuses the same file.
A save writes PATH.tmp and renames it to PATH once complete.
"""

import collections
import os
import struct
import zlib

from pushpull import wire

SPILL_MAGIC = b"ZPPSPILL2\n"  # first bytes of a spill file, format 2
SPILL_MAGIC_1 = b"ZPPSPILL1\n"  # format 1: no CRCs, no trailer, wire format 1 frames
RECORD = struct.Struct("!II")  # frame length (bytes), CRC-32 of the frame
END_MARK = struct.pack("!I", 0xFFFFFFFF)  # where a record's length would be: the trailer
TRAILER = struct.Struct("!QI")  # frames in the file, CRC-32 of those 8 bytes
TEMPORARY_SUFFIX = ".tmp"  # PATH.tmp: a save in progress
DRAIN_SUFFIX = ".drain"  # PATH.drain: a warm stop's overflow, being read back to process
LOCK_SUFFIX = ".lock"  # PATH.lock: held by the receiver that owns PATH


class SpillError(Exception):
    """The spill file cannot be used: unreadable, damaged, or another receiver's."""


# ---------------------------------------------------------------------------
# Ownership: one receiver per spill file
# ---------------------------------------------------------------------------
def _lock_exclusively(handle):
    """Lock an open file for this process, without waiting; OSError if another holds it.

    The operating system lets go when the process ends, however it ends.
    """
    if os.name == "nt":
        import msvcrt
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


class SpillLock:
    """PATH.lock, locked while this receiver owns the spill file PATH; holds its pid."""

    def __init__(self, path):
        self.spill_path = path
        self.path = path + LOCK_SUFFIX
        self._handle = None

    def acquire(self):
        """Take the lock; SpillError if another receiver holds it or it cannot be made."""
        while self._handle is None:
            try:
                handle = open(self.path, "a+", encoding="ascii")
            except OSError as exc:
                raise SpillError(f"cannot create {self.path}: {exc.strerror}") from None
            try:
                _lock_exclusively(handle)
            except OSError:
                owner = _owner(handle)
                handle.close()
                raise SpillError(f"spill file {self.spill_path} is in use by another receiver"
                                 f"{owner}: give each receiver its own --spill-file") from None
            if _same_file(handle, self.path):
                handle.seek(0)
                handle.truncate()
                handle.write(str(os.getpid()))
                handle.flush()
                self._handle = handle
            else:
                handle.close()  # its owner removed it as we locked it: lock the new one

    def release(self):
        """Remove the lock file and let go of the lock."""
        if self._handle is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass  # Windows keeps an open file; the lock itself goes with the handle
        self._handle.close()
        self._handle = None


def _owner(handle):
    """' (pid N)' from a lock file held by another receiver, or '' if it cannot be read."""
    try:
        handle.seek(0)
        pid = handle.read(20).strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _same_file(handle, path):
    """True when the open `handle` is still the file at `path`."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def remove_stale_temporary(path):
    """Remove PATH.tmp and PATH.drain, left when a receiver was killed while saving (or
    reading back a warm stop's overflow); True if there was one.

    Call it with the lock held: only then is no live receiver writing it.
    """
    found = False
    for suffix in (TEMPORARY_SUFFIX, DRAIN_SUFFIX):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SpillError(f"cannot remove {path}{suffix}: {exc.strerror}") from None
        found = True
    return found


# ---------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------
def load(path):
    """The messages saved to `path`, decoded, and how many frames did not decode;
    ([], 0) when there is no spill file or it is empty. Raises SpillError."""
    messages, invalid, run_cache = [], 0, wire.new_run_cache()
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
    if not data:
        return []  # created, never written: nothing was saved
    keep = "kept as it is: move it away to start without it"
    if data.startswith(SPILL_MAGIC_1):
        raise SpillError(f"spill file {path} was written by an older receiver (spill format"
                         f" 1), whose messages this one cannot decode ({keep})")
    if not data.startswith(SPILL_MAGIC):
        raise SpillError(f"spill file {path} is not a spill file ({keep})")
    try:
        return _frames(data, len(SPILL_MAGIC))
    except SpillError as exc:
        raise SpillError(f"spill file {path} is {exc} ({keep})") from None


def _frames(data, pos):
    """Format 2: every frame's CRC checked, the trailer's count too."""
    frames = []
    while True:
        if pos + RECORD.size > len(data):
            raise SpillError(f"truncated after {len(frames)} frames (no trailer)")
        if data.startswith(END_MARK, pos):
            pos += len(END_MARK)
            break
        size, crc = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        frame = data[pos:pos + size]
        if len(frame) < size:
            raise SpillError(f"truncated in frame {len(frames) + 1}")
        if zlib.crc32(frame) != crc:
            raise SpillError(f"corrupt: frame {len(frames) + 1} fails its CRC")
        frames.append(frame)
        pos += size
    if pos + TRAILER.size != len(data):
        raise SpillError("corrupt: the trailer is not where the file ends")
    count, crc = TRAILER.unpack_from(data, pos)
    if zlib.crc32(data[pos:pos + 8]) != crc or count != len(frames):
        raise SpillError(f"corrupt: the trailer does not count the {len(frames)} frames")
    return frames


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
class SpillWriter:
    """Writes a spill file: frames go to PATH.tmp as they come; commit() makes it PATH.

    Counts what it holds, for the receiver's one set of spill counts: `data`
    (messages that carry a task: END frames do not) and `runs` (RunInfo -> how many
    of `data` are that run's). A failed write gives the whole file up: `lost` then
    counts every message it had or was given, and `error` says why.
    """

    def __init__(self, path):
        self.path = path
        self.temporary = path + TEMPORARY_SUFFIX
        self.frames = 0
        self.data = 0
        self.runs = collections.Counter()
        self.lost = 0
        self.error = None
        self._file = None

    @property
    def started(self):
        """True once a message was given to it."""
        return bool(self.frames or self.lost or self._file is not None)

    def write(self, messages):
        """Append messages (their raw frames) to PATH.tmp; raises OSError."""
        if self.error is not None:
            self.lost += count_data(messages)
            raise OSError(self.error)
        records = []
        for msg in messages:
            frame = msg[wire.RAW]
            records += (RECORD.pack(len(frame), zlib.crc32(frame)), frame)
        try:
            if self._file is None:
                self._file = open(self.temporary, "wb")
                self._file.write(SPILL_MAGIC)
            self._file.write(b"".join(records))
        except OSError as exc:
            self._fail(exc, count_data(messages))
            raise
        self.frames += len(messages)
        for msg in messages:
            if msg[wire.KIND] == wire.DATA:
                self.data += 1
                if msg[wire.RUN] is not None:
                    self.runs[msg[wire.RUN]] += 1

    def commit(self):
        """Write the trailer, flush the file to disk and rename it to PATH; raises OSError."""
        if self.error is not None:
            raise OSError(self.error)
        if self._file is None:
            return
        count = self.frames.to_bytes(8, "big")
        try:
            self._file.write(END_MARK + TRAILER.pack(self.frames, zlib.crc32(count)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temporary, self.path)
        except OSError as exc:
            self._fail(exc, 0)
            raise
        self._file = None

    def flush(self):
        """Push what was written to the file (for a reader in another thread)."""
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as exc:
            self._fail(exc, 0)

    def detach(self):
        """Hand what was written over for reading back (a warm stop processes it): PATH.tmp
        becomes PATH.drain, whose path is returned, and the writer starts empty; None,
        and the file given up, if it cannot be flushed or renamed."""
        drain = self.path + DRAIN_SUFFIX
        try:
            self._file.close()
            os.replace(self.temporary, drain)
        except OSError as exc:
            self._file = None  # closed, or as good as
            self._fail(exc, 0)
            return None
        self._file = None
        self.frames = self.data = 0
        self.runs.clear()
        return drain

    def _fail(self, exc, more_lost):
        """Give up the file: close and remove PATH.tmp; everything it held is lost."""
        self.error = exc.strerror or str(exc)
        self.lost += self.data + more_lost
        self.data, self.frames = 0, 0
        self.runs.clear()
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # a full disk can fail the close too: the file goes anyway
            self._file = None
        try:
            os.remove(self.temporary)
        except OSError:
            pass  # never created, or already gone


class DrainFeed:
    """Reads a detached overflow file (SpillWriter.detach) back in batches of at most
    `batch_max` frames and `max_bytes` bytes (one frame past it at most), decoded with
    the receive thread's `run_cache`: the warm stop processes them, or a cold stop
    saves the rest. A frame that fails its CRC ends the reading (`error`, and those
    frames are counted in `lost`)."""

    def __init__(self, path, batch_max, max_bytes, run_cache):
        self.path = path
        self.batch_max = batch_max
        self.max_bytes = max_bytes
        self.run_cache = run_cache
        self.error = None
        self._file = open(path, "rb")
        if self._file.read(len(SPILL_MAGIC)) != SPILL_MAGIC:
            self.error = "its first bytes are not a spill file's"
        self._held = None  # a batch taken but not processed: next() gives it again

    def next(self):
        """The next batch of decoded messages, or None at the end."""
        if self._held is not None:
            batch, self._held = self._held, None
            return batch
        messages, size = [], 0
        while self.error is None and len(messages) < self.batch_max and size < self.max_bytes:
            frame = self._frame()
            if frame is None:
                break
            size += len(frame)
            try:
                messages.append(wire.decode(frame, self.run_cache))
            except wire.InvalidMessage as exc:  # decoded once already: the file was changed
                self.error = f"a frame no longer decodes ({exc})"
        return messages or None

    def hold(self, messages):
        """Give back a batch from next() that could not be processed (a cold stop)."""
        self._held = messages

    def _frame(self):
        head = self._file.read(RECORD.size)
        if len(head) < RECORD.size:
            return None
        size, crc = RECORD.unpack(head)
        frame = self._file.read(size)
        if len(frame) != size or zlib.crc32(frame) != crc:
            self.error = "a frame fails its CRC"
            return None
        return frame

    def close(self):
        """Close and remove the file: everything in it was processed or saved."""
        self._file.close()
        try:
            os.remove(self.path)
        except OSError:
            pass  # gone already; a stale one is removed at the next start


def count_data(messages):
    """How many of the messages carry a task (END frames do not)."""
    return sum(1 for msg in messages if msg[wire.KIND] == wire.DATA)


def save(path, messages):
    """Save messages (their raw frames) to `path` in one go; raises OSError."""
    writer = SpillWriter(path)
    writer.write(messages)
    writer.commit()
    return writer


def remove(path):
    """Delete the spill file once its frames are processed; False if there was none.

    Raises OSError when it exists but cannot be removed.
    """
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------
# The receiver's run: read back at start, removed once processed, saved at a stop
# ---------------------------------------------------------------------------
def recover(path, log):
    """At start: what a spill file holds (messages, invalid count), after the checks;
    SpillError when it cannot be used. A file with nothing to process is removed."""
    if remove_stale_temporary(path):
        log.warning(f"[SPILL] removed {path}{TEMPORARY_SUFFIX}: a receiver was stopped"
                    " (killed?) while it saved its spill file; the messages it held are lost")
    recovered, invalid = load(path)
    if not recovered and os.path.exists(path):
        # Nothing to process: counted once here, not again at every start.
        remove(path)
        log.warning(f"[SPILL] {path} held no message to process ({invalid} invalid);"
                    " removed")
    return recovered, invalid


def known_runs(recovered):
    """wire.decode()'s run cache, knowing the recovered messages' runs: new frames of
    those runs must agree with them."""
    run_cache = wire.new_run_cache()
    for msg in recovered:
        info = msg[wire.RUN]
        if info is not None and info.run_id not in run_cache:
            wire.remember_run(run_cache, info)
    return run_cache


def remove_processed(path, log):
    """The spill file's messages are all processed: remove it."""
    try:
        if remove(path):
            log.info(f"[SPILL] recovered messages processed; removed {path}")
    except OSError as exc:
        log.warning(f"[SPILL] could not remove {path}: {exc.strerror}")


def save_at_stop(writer, leftovers, counters, run_table, log, feed=None):
    """Complete the spill file: what the warm-stop drain put there, then what a cold
    stop left unprocessed, then what of the drain's overflow was not read back yet
    (`feed`, a DrainFeed, closed here). Counted once, for the [RUN] lines, runs[] and
    the summary: counters.spilled, and each run's share (run_table, a runs.RunTable)."""
    try:
        writer.write(leftovers)
        while feed is not None:
            messages = feed.next()
            if messages is None:
                break
            writer.write(messages)
        writer.commit()
    except OSError:
        while feed is not None:  # what the file did not get is lost too
            messages = feed.next()
            if messages is None:
                break
            writer.lost += count_data(messages)
        log.error(f"[SPILL] could not write {writer.path}: {writer.error}; {writer.lost}"
                  " received but unprocessed messages LOST")
        return
    finally:
        if feed is not None:
            if feed.error:
                log.error(f"[SPILL] reading back {feed.path}: {feed.error}; the messages"
                          " after it are LOST")
            feed.close()
    counters.spilled = writer.data
    run_table.count_spilled(writer.runs)
    log.warning(f"[SPILL] {writer.data} received but unprocessed messages saved to"
                f" {writer.path}; the next start processes them first")
