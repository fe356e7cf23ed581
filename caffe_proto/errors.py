from ..errors import SegawareError


class CaffeFormatError(SegawareError, ValueError):
    """A Caffe file (or text) that cannot be read; the message names the file and the place."""
