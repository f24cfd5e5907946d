"""One image decoder process: `python -m service.decoder MEMORY_BYTES CPU_S`.

The gateway (service/decode_pool.py) keeps a few of these and sends each untrusted upload
to one: whatever the bytes make Pillow do happens here, under this process's limits,
never in a request thread. The process decodes one image at a time, for as long as it
lives:

- its address space is bounded at start to what it holds then plus MEMORY_BYTES
  (RLIMIT_AS): an allocation beyond fails, the image is refused and the process exits;
- each decode gets CPU_S seconds of CPU (RLIMIT_CPU, raised before each): past them the
  kernel ends the process with SIGXCPU;
- the out-of-memory killer takes it before the gateway (oom_score_adj 1000).

Messages on stdin and stdout are a 4-byte big-endian length, a JSON header, then the
header's `bytes` raw bytes (the upload; the RGB pixels back): no pickle, so a decoder
that a hostile file took over cannot make the gateway run code.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Any, BinaryIO

import numpy as np

from ddim_inversion import imaging

MAX_HEADER_BYTES = 64 * 1024
"""Longest JSON header either side accepts."""

MEMORY_EXCEEDED = "decode_memory"
"""The code of a reply whose decode ran out of its address space (the process then exits)."""


def message_head(header: dict[str, Any], payload_bytes: int) -> bytes:
    """A message's length prefix and JSON header (its `bytes`: the payload's length)."""
    encoded = json.dumps({**header, "bytes": payload_bytes}).encode()
    return len(encoded).to_bytes(4, "big") + encoded


def header_length(prefix: bytes) -> int:
    """The JSON header's length from its 4-byte prefix; ValueError when over the limit."""
    length = int.from_bytes(prefix, "big")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"a message header of {length} bytes")
    return length


def write_message(stream: BinaryIO, header: dict[str, Any], payload: bytes = b"") -> None:
    """One message: its head, then the payload."""
    stream.write(message_head(header, len(payload)))
    stream.write(payload)
    stream.flush()


def read_message(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """The next message, or None at the end of the stream."""
    prefix = stream.read(4)
    if len(prefix) < 4:
        return None
    header = json.loads(stream.read(header_length(prefix)))
    payload = stream.read(int(header["bytes"]))
    if len(payload) != header["bytes"]:
        return None
    return header, payload


def decode(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    """The reply to one request: the normalised RGB pixels, or why the image is refused."""
    size = header.get("size")
    try:
        rgb = imaging.normalize(
            data,
            None if size is None else (int(size[0]), int(size[1])),
            header.get("resize_mode", "center_crop"),
            max_pixels=int(header["max_pixels"]),
            allowed_formats=tuple(header["allowed_formats"]),
            max_decode_bytes=int(header["max_decode_bytes"]),
            max_jpeg_scans=int(header["max_jpeg_scans"]),
            max_frames=int(header["max_frames"]),
        )
    except imaging.ImageRejected as exc:
        return {"ok": False, "code": exc.code, "message": exc.message}, b""
    except MemoryError:
        limit = header.get("memory_bytes")
        message = f"decoding the image needs more than {limit} bytes of memory"
        return {"ok": False, "code": MEMORY_EXCEEDED, "message": message}, b""
    except Exception as exc:  # whatever untrusted bytes make a decoder raise is theirs
        message = f"the image cannot be decoded: {type(exc).__name__}: {exc}"
        return {"ok": False, "code": "invalid_input", "message": message}, b""
    height, width = rgb.shape[:2]
    return {"ok": True, "width": width, "height": height}, rgb.tobytes()


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux); 0 where unknown."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _first_to_go() -> None:
    """Offer this process first to the kernel's out-of-memory killer (a container's
    memory limit counts the gateway and its decoders together): a decoder dies, never the
    gateway. Raising one's own score needs no privilege."""
    try:
        with open("/proc/self/oom_score_adj", "w") as score:
            score.write("1000")
    except OSError:
        pass  # not Linux


def _limit_cpu(seconds: int) -> None:
    """SIGXCPU once this process has used `seconds` more of CPU (whole seconds: the
    kernel's unit). The hard limit stays unlimited so that the next decode may raise it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))


def serve(memory_bytes: int, cpu_s: int, requests: BinaryIO, replies: BinaryIO) -> None:
    """Decode requests until the end of `requests` (or an allocation failed)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed decoder leaves no core file
    _first_to_go()
    held = _address_space()
    if held:
        resource.setrlimit(resource.RLIMIT_AS, (held + memory_bytes, held + memory_bytes))
    while (message := read_message(requests)) is not None:
        header, data = message
        _limit_cpu(cpu_s)
        reply, pixels = decode({**header, "memory_bytes": memory_bytes}, data)
        del data
        write_message(replies, reply, pixels)
        if reply.get("code") == MEMORY_EXCEEDED:
            return  # its heap may be fragmented: the pool starts a fresh one


def main() -> None:
    memory_bytes, cpu_s = int(sys.argv[1]), int(sys.argv[2])
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    np.seterr(all="ignore")  # NaN floats clip like any other value
    serve(memory_bytes, cpu_s, sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
