"""How values become bytes, for the wire and for the checkpoint log alike.

One policy, two users: ``protocol.py`` frames what it produces for a
socket, ``checkpoint/_format.py`` for a file. Each keeps its own layout (a
frame's buffer table, a record's value section); what they share is here:

Pickling
    Pickle protocol 5 with out-of-band buffers, so that a NumPy array's
    data is not copied into the pickle. Plain ``pickle`` is tried first
    because it is several times faster than cloudpickle on small objects;
    cloudpickle takes over for what pickle refuses (lambdas, closures,
    functions of ``__main__``).

Compression
    A part (a pickle or one of its buffers) of at least a caller-chosen
    size is lz4 block-compressed, with its size stored, when a trial on its
    first ``TRIAL`` bytes compresses below ``PAYOFF`` of them:
    incompressible data costs one small trial, not a full compression. The
    codec of each part is ``CODEC_RAW`` or ``CODEC_LZ4``.

Decompression
    lz4 allocates the size a block's header declares before it
    decompresses; a damaged or hostile header must not make it allocate
    gigabytes, so a block declaring more than ``LZ4_MAX_RATIO`` times its
    stored size is refused first (no real block expands that much).

This module imports nothing else of async_wf, so the checkpoint package can
use it without the runtime.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import cloudpickle
import lz4.block

CODEC_RAW = 0
CODEC_LZ4 = 1
#: bytes of a part compressed to decide whether compressing all of it pays
TRIAL = 1 << 16
#: the trial must shrink below this fraction of its input for the part to be compressed
PAYOFF = 0.9
#: an lz4 block never decompresses to more than about 255 times its size
LZ4_MAX_RATIO = 256


class CodecError(ValueError):
    """A stored part cannot be decoded: a corrupt or implausible lz4 block."""


def pack(obj: Any, bufs: list[pickle.PickleBuffer], main_by_value: bool = False) -> bytes:
    """Pickle ``obj`` on its own; its out-of-band buffers are appended to ``bufs``.

    Tasks' arguments and results are packed one by one inside a frame, so
    that one that cannot be unpickled on the other side fails its own task,
    not the whole frame (and with it the connection).

    ``main_by_value``: what plain pickle would refer to by the name
    ``__main__.X`` (a class or function of the program's script) goes by
    value, through cloudpickle, as task functions do: a worker's ``__main__``
    is not the program's. For arguments only: a result must come back as
    the program's own class, by name.

    Raises:
        pickle.PicklingError (or what cloudpickle raises): ``obj`` cannot be pickled.
    """
    n0 = len(bufs)
    try:
        blob = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
        # the module name appears in the pickle of any reference to it; a
        # string that merely contains it costs a cloudpickle, nothing worse
        if not (main_by_value and b"__main__" in blob):
            return blob
    except Exception:
        pass
    del bufs[n0:]
    f = io.BytesIO()
    cloudpickle.CloudPickler(f, protocol=5, buffer_callback=bufs.append).dump(obj)
    return f.getvalue()


def unpack(blob: bytes, buffers: list[Any], start: int, count: int) -> Any:
    """Unpickle what ``pack`` made, with its ``count`` buffers from ``buffers[start:]``.

    Raises:
        Exception: whatever unpickling raises (a missing module, a bad class).
    """
    return pickle.loads(blob, buffers=buffers[start : start + count])


def compress(data: Any, min_size: int) -> tuple[int, Any]:
    """``(codec, stored)``: ``data`` lz4-compressed if it is large enough and the trial pays.

    ``data``: bytes or a byte memoryview; ``min_size``: parts smaller than
    this are stored raw (0: never compress). ``stored`` is ``data`` itself
    when the codec is ``CODEC_RAW``, else the lz4 block (with its size).
    """
    n = data.nbytes if isinstance(data, memoryview) else len(data)
    if min_size and n >= min_size:
        mv = memoryview(data)
        trial = lz4.block.compress(mv[:TRIAL], store_size=False)
        if len(trial) < PAYOFF * min(TRIAL, n):
            return CODEC_LZ4, lz4.block.compress(mv, store_size=True)
    return CODEC_RAW, data


def decompress(chunk: memoryview) -> bytearray:
    """The bytes of an lz4 block made by ``compress``, as a writable bytearray.

    Writable, so that arrays unpickled on it are writable like those on raw
    buffers.

    Raises:
        CodecError: the block declares an implausible size, or does not decode.
    """
    stored = chunk.nbytes
    declared = int.from_bytes(chunk[:4], "little") if stored >= 4 else -1
    if not 0 <= declared <= LZ4_MAX_RATIO * stored:
        raise CodecError(f"lz4 block of {stored} bytes declares {declared} bytes")
    try:
        out: bytearray = lz4.block.decompress(chunk, return_bytearray=True)
    except Exception as exc:
        raise CodecError(f"undecodable lz4 block: {exc}") from exc
    return out
