"""`segaware-caffe VERB ...`: the caffe binary's verbs and our own.

Each verb lives in ``tools/cmd_<verb>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``.

Every failure ends in one or two lines on stderr and a non-zero exit status, never a traceback:
1 for a reported problem (a file that cannot be read, a net that cannot be built, a bad option
value, a missing or existing file, a feature that is not supported), 2 for options argparse rejects, 3 for an internal error (a bug:
the line says where; `--debug` or SEGAWARE_DEBUG=1 prints the traceback), 130 when interrupted.

Only the module of the verb asked for is imported, and no verb module imports torch before its
`run`, so `--help` and option errors answer at once.
"""
import argparse
import importlib
import os
import sys
import traceback
import warnings

VERBS = {  # verb -> one-line help
    "inspect": "table of a net's layers, blobs and parameters",
    "run": "run a net on an image or array and save its outputs",
    "train": "train with a solver prototxt (like `caffe train`)",
    "test": "score a model (like `caffe test`)",
    "time": "per-layer forward/backward timing (like `caffe time`)",
    "convert": "caffemodel <-> safetensors / state_dict",
    "export": "write a standalone PyTorch module (or ONNX)",
    "demo": "local attention masks and segmentation-aware filtering on a bundled photo",
    "eval": "mean IoU of predicted PNGs (or .mat score maps) against ground truth",
    "mat2png": "VOC-palette label PNGs from MatWrite .mat score maps, cropped to each image",
    "resize": "move a deploy net that hard-codes sizes to another input size",
    "plot": "loss / learning-rate / accuracy curves of a Caffe-format training log",
}
PROG = "segaware-caffe"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
DEBUG_ENV = "SEGAWARE_DEBUG"
MESSAGE_LIMIT = 2000   # characters of an error message shown (a message can quote a whole file)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a two-line error (the problem, then where to look) instead of the usage
    block, which runs to a dozen lines for the verbs with many options."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _memory_size(text):
    """argparse type of --max-memory: a size such as 8G, 512M or a number of bytes."""
    from segaware_caffe.budget import parse_bytes
    from segaware_caffe.errors import MemoryBudgetError
    try:
        return parse_bytes(text, "--max-memory")
    except MemoryBudgetError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


MAX_MEMORY_HELP = ("memory budget for the nets this command builds (e.g. 8G, 512M); a net "
                   "whose blobs would need more is refused before anything is allocated "
                   "(default $SEGAWARE_MAX_BYTES, else half of the memory this process may use)")


def _debug_parent():
    # --debug and --max-memory are accepted after the verb too; SUPPRESS keeps the subparser
    # from resetting them
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    parent.add_argument("--max-memory", type=_memory_size, default=argparse.SUPPRESS,
                        metavar="SIZE", help=MAX_MEMORY_HELP)
    return parent


def _verb_in(argv):
    """The verb of a command line: its first word that is neither an option nor the value of one
    (the options before a verb are --debug, --help and --max-memory SIZE), or None."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return None
        if word == "--max-memory":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(verb=None):
    """(parser, {verb: module}). Every verb gets a subparser (so --help lists them and argparse
    names a misspelt one), but only `verb`'s module is imported and its options added; verb=None
    imports them all."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", default=False,
                        help="print the traceback of an error")
    parser.add_argument("--max-memory", type=_memory_size, default=None, metavar="SIZE",
                        help=MAX_MEMORY_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=ArgumentParser)
    parent = _debug_parent()
    modules = {}
    for name, help_text in VERBS.items():
        if verb is not None and name != verb:
            sub.add_parser(name, help=help_text, description=help_text, parents=[parent])
            continue
        try:
            module = importlib.import_module(f"segaware_caffe.tools.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"segaware_caffe.tools.cmd_{name}":
                raise
            continue  # verb not available in this build
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text,
                                            parents=[parent]))
    return parser, modules


def _text(error, single_line=False):
    """An error's message, shortened past MESSAGE_LIMIT characters (a message may quote a file);
    our messages keep their lines (a prototxt error shows the line and a caret)."""
    text = str(error).strip()
    if single_line:
        text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + " [...]"


def _place(error):
    """file:line of the innermost frame of an exception (where a bug surfaced)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"


def report(error, label, debug):
    """(exit status, message) for an exception raised by a verb."""
    from segaware_caffe.errors import SegawareError

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, f"{label}: interrupted"
    if isinstance(error, SegawareError):
        return EXIT_ERROR, f"{label}: error: {_text(error)}"
    if isinstance(error, OSError):
        # open() and friends: name the file when the message does not
        text = error.strerror or str(error)
        names = [n for n in (error.filename, error.filename2) if n is not None]
        if names and not any(os.fspath(n) in text for n in names):
            text = f"{' -> '.join(map(os.fspath, names))}: {text}"
        return EXIT_ERROR, f"{label}: error: {_text(text)}"
    if isinstance(error, NotImplementedError) and str(error).strip():
        # raised on purpose, with a message, for valid input this project does not support
        return EXIT_ERROR, f"{label}: error: {_text(error)}"
    if isinstance(error, MemoryError):
        return EXIT_ERROR, (f"{label}: error: not enough memory ({_text(error, True) or 'MemoryError'}); "
                            f"a size in the input is too large for this machine")
    hint = "" if debug else " (run with --debug for the traceback)"
    return EXIT_INTERNAL, (f"{label}: internal error: {type(error).__name__}: "
                           f"{_text(error, True)} at {_place(error)}{hint}")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # warnings of the library are messages for the user, not a pointer into our source
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


def openmp_defaults():
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy: torch's OpenMP threads then sleep
    at the end of a parallel region instead of spinning, so a run with several threads degrades
    gracefully when other work shares the cores (spinning threads that wait for a descheduled
    one made 2-thread forwards 3-100x slower than 1 thread on a busy machine). libgomp reads it
    once, when torch loads it, so it is set before any verb imports torch."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _memory_budget(max_bytes):
    """The --max-memory budget for the verb's nets (a no-op without the option)."""
    import contextlib
    if max_bytes is None:
        return contextlib.nullcontext()
    from segaware_caffe.budget import limit
    return limit(max_bytes)


def allocator_defaults():
    """Large tensors reuse the process's freed memory (segaware_caffe.allocator) unless
    SEGAWARE_KEEP_FREED_MEMORY=0: the command owns its process, and the memory a forward
    peaks at is what the next one needs again."""
    if os.environ.get("SEGAWARE_KEEP_FREED_MEMORY", "1").strip() != "0":
        from segaware_caffe.allocator import keep_freed_memory
        keep_freed_memory()


def main(argv=None):
    openmp_defaults()
    allocator_defaults()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    label = PROG
    try:
        verb = _verb_in(argv)
        parser, modules = build_parser(verb if verb in VERBS else "")
        args = parser.parse_args(argv)
        debug = debug or getattr(args, "debug", False)
        label = f"{PROG} {args.verb}" if args.verb else PROG
        if args.verb is None:
            parser.print_help()
            return EXIT_USAGE
        with warnings.catch_warnings(), _memory_budget(getattr(args, "max_memory", None)):
            if not debug:
                warnings.showwarning = _show_warning
            return modules[args.verb].run(args) or 0
    except SystemExit:
        raise   # argparse's own exit (--help, or an option it rejected): already printed
    except BrokenPipeError:
        # the reader of our output went away (`| head`): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_ERROR
    except BaseException as error:   # noqa: B902 - every failure ends in a message, see above
        if not isinstance(error, Exception) and not isinstance(error, KeyboardInterrupt):
            raise
        status, message = report(error, label, debug)
        if debug:
            traceback.print_exc()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        print(message, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
