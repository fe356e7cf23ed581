"""Caffe-style (glog) log lines and a small progress bar.

A line looks like ``I1122 04:05:06.123456 12345 solver.py:228] Iteration 20, loss = 0.693``:
severity letter, month and day, wall time with microseconds, process id, source file:line. BVLC's
tools/extra/parse_log.py reads exactly these lines (it needs the time stamp on every line).
Numbers are printed like a C++ ostream with its default precision (``%g``, 6 significant digits).
"""
import datetime
import logging
import sys
import time

_LETTERS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
            logging.CRITICAL: "F"}


def fmt(value):
    """A number as Caffe's `LOG(INFO) << value` prints it."""
    return f"{float(value):g}"


def loss_note(weight, value):
    """Caffe's suffix for an output with a loss weight: " (* 1 = 0.69 loss)" ("" for weight 0)."""
    return f" (* {fmt(weight)} = {fmt(weight * value)} loss)" if weight else ""


class GlogFormatter(logging.Formatter):
    """glog line format. clear_line=True starts each line by erasing the terminal line (so a
    progress bar drawn there is overwritten, then redrawn below)."""

    def __init__(self, clear_line=False):
        super().__init__()
        self.clear_line = clear_line

    def format(self, record):
        stamp = datetime.datetime.fromtimestamp(record.created)
        letter = _LETTERS.get(record.levelno, "I")
        prefix = (f"{letter}{stamp:%m%d %H:%M:%S}.{stamp.microsecond:06d} {record.process:>5} "
                  f"{record.filename}:{record.lineno}] ")
        text = ("\r\033[K" if self.clear_line else "") + prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class glog_to:
    """Context manager: send INFO lines of the `segaware_caffe` loggers to `stream` (default
    stderr, like the caffe binary) in glog format.

        with glog_to(sys.stderr):
            solver.solve()
    """

    def __init__(self, stream=None, logger="segaware_caffe", level=logging.INFO):
        self.stream, self.logger_name, self.level = stream, logger, level

    def __enter__(self):
        self.logger = logging.getLogger(self.logger_name)
        stream = self.stream if self.stream is not None else sys.stderr
        self.handler = logging.StreamHandler(stream)
        self.handler.setFormatter(GlogFormatter(clear_line=_is_tty(stream)))
        self.previous_level = self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(self.level)
        return self.handler

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.previous_level)
        return False


def duration(seconds):
    """A duration as H:MM:SS (M:SS under an hour)."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Rate:
    """Speed and time left of a run of `total` steps, measured from the first `update`."""

    def __init__(self, total, clock=time.monotonic):
        self.total, self.clock = max(int(total), 0), clock
        self.start = self.done = None

    def update(self, done):
        if self.start is None:
            self.start, self.first = self.clock(), done
        self.done = done

    @property
    def per_second(self):
        """Steps per second since the first update (None before two updates apart in time)."""
        if self.start is None:
            return None
        elapsed = self.clock() - self.start
        steps = self.done - self.first
        return steps / elapsed if elapsed > 0 and steps > 0 else None

    def text(self, unit="iter"):
        """"2.5 iter/s, ETA 0:40" (or "" until a speed is known)."""
        rate = self.per_second
        if rate is None:
            return ""
        speed = f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}"
        left = max(self.total - self.done, 0) / rate
        return f"{speed}, ETA {duration(left)}"


class ProgressBar:
    """``[#######.............]  35/100 iter  2.5 iter/s, ETA 0:26  loss 0.6931`` redrawn in place
    on a terminal (speed and time left from the steps done since the first update).

    enabled=None: on only when `stream` is a tty (so logs and pipes stay clean).
    """

    def __init__(self, total, stream=None, enabled=None, width=30, unit="iter",
                 clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = _is_tty(self.stream)
        self.total, self.enabled, self.width = max(int(total), 0), enabled, width
        self.unit = unit
        self.rate = Rate(self.total, clock)
        self.shown = False

    def update(self, done, loss=None):
        self.rate.update(done)
        if not self.enabled or not self.total:
            return
        filled = int(self.width * min(done, self.total) / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        speed = self.rate.text(self.unit)
        tail = (f"  {speed}" if speed else "") + (f"  loss {fmt(loss)}" if loss is not None else "")
        self.stream.write(f"\r[{bar}] {done:>{len(str(self.total))}}/{self.total} {self.unit}"
                          f"{tail}\033[K")
        self.stream.flush()
        self.shown = True

    def close(self):
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
