"""FUSE_LSEEK (SEEK_DATA / SEEK_HOLE) for a pyfuse3 session, which pyfuse3 (3.5) does not offer.

Without an ``lseek`` operation the kernel answers SEEK_DATA and SEEK_HOLE itself as if every
byte were data (POSIX allows it); tmpfs reports the holes of a sparse file. libfuse has the
operation (``fuse_lowlevel_ops.lseek``, since 3.8): this module puts a ctypes callback into the
copy of the operations table that the live session holds, right after ``pyfuse3.init``.

That table is private memory of pyfuse3 and libfuse, so every step is checked and any doubt
leaves the session as it was (the kernel's answers then stand):

- pyfuse3's own table (``fuse_ops``, a static of the extension) is found by its symbol in the
  extension's ELF symbol table, and its filled and empty slots must be exactly the ones
  pyfuse3 fills (lseek empty);
- the session's copy is found by comparing those bytes against the session's memory, and must
  occur exactly once.

The callback runs on the trio thread inside ``fuse_session_process_buf`` (pyfuse3 calls it with
the GIL held), so it may read the file system's state directly; it always replies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# struct fuse_lowlevel_ops (libfuse 3.8 ... 3.16): 44 function pointers, lseek last.
NR_OPS = 44
LSEEK_SLOT = 43
# Slots pyfuse3 fills: init lookup forget getattr setattr readlink mknod mkdir unlink rmdir
# symlink rename link open read write flush release fsync opendir releasedir fsyncdir statfs
# setxattr getxattr listxattr removexattr access create poll write_buf forget_multi readdirplus.
PYFUSE3_SLOTS = frozenset(
    [0, *range(2, 21), *range(22, 31), 35, 36, 38, 41],
)
SESSION_SCAN = 1024  # bytes of struct fuse_session searched for its copy of the table

Seek = Callable[[int, int, int], int]  # (inode, offset, whence) -> offset; OSError(errno)

_LSEEK_FN = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
)
_installed: list[object] = []  # keeps the callback (and its closure) alive for the process


def install(seek: Seek) -> bool:
    """Answer FUSE_LSEEK with ``seek`` in the current pyfuse3 session; False if not possible."""
    try:
        return _install(seek)
    except Exception as e:  # any surprise: leave the session alone
        log.info("SEEK_DATA/SEEK_HOLE stay the kernel's (%s)", e)
        return False


def _install(seek: Seek) -> bool:
    import pyfuse3

    so = Path(pyfuse3.__file__ or "")
    syms = elf_symbols(
        so, ("PyInit_pyfuse3", "__pyx_v_7pyfuse3_fuse_ops", "__pyx_v_7pyfuse3_session")
    )
    if len(syms) != 3:
        log.info("SEEK_DATA/SEEK_HOLE stay the kernel's (no symbols in %s)", so.name)
        return False
    ext = ctypes.CDLL(str(so))
    init_addr = ctypes.cast(ext.PyInit_pyfuse3, ctypes.c_void_p).value
    if init_addr is None:
        return False
    base = init_addr - syms["PyInit_pyfuse3"]
    ops = ctypes.string_at(base + syms["__pyx_v_7pyfuse3_fuse_ops"], NR_OPS * 8)
    slots = struct.unpack(f"<{NR_OPS}Q", ops)
    filled = frozenset(i for i, p in enumerate(slots) if p)
    if filled != PYFUSE3_SLOTS:
        log.info("SEEK_DATA/SEEK_HOLE stay the kernel's (pyfuse3's table is not as expected)")
        return False
    session = ctypes.c_void_p.from_address(base + syms["__pyx_v_7pyfuse3_session"]).value
    if not session:
        return False
    mem = ctypes.string_at(session, SESSION_SCAN)
    hits = [k for k in range(0, SESSION_SCAN - len(ops) + 1, 8) if mem[k : k + len(ops)] == ops]
    if len(hits) != 1:
        log.info("SEEK_DATA/SEEK_HOLE stay the kernel's (session table found %d times)", len(hits))
        return False

    libfuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    reply_lseek = libfuse.fuse_reply_lseek
    reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    reply_lseek.restype = ctypes.c_int
    reply_err = libfuse.fuse_reply_err
    reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    reply_err.restype = ctypes.c_int

    def on_lseek(req: int | None, ino: int, off: int, whence: int, fi: int | None) -> None:
        try:
            reply_lseek(req, seek(ino, off, whence))
        except OSError as e:
            reply_err(req, e.errno or errno.EIO)
        except BaseException as e:  # the request must get an answer, whatever happened
            code = getattr(e, "errno", None)
            if not isinstance(code, int):
                log.exception("lseek(%d, %d, %d) failed; answering EIO", ino, off, whence)
                code = errno.EIO
            reply_err(req, code)

    fn = _LSEEK_FN(on_lseek)
    _installed.append(fn)
    slot = session + hits[0] + LSEEK_SLOT * 8
    ctypes.c_void_p.from_address(slot).value = ctypes.cast(fn, ctypes.c_void_p).value
    log.debug("FUSE_LSEEK answered by gemfs (SEEK_DATA/SEEK_HOLE)")
    return True


def elf_symbols(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Values of the named symbols in an ELF64 little-endian file's .symtab (static ones too)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    wanted = {n.encode(): n for n in names}
    found: dict[str, int] = {}
    for _name, sh_type, _f, _a, off, size, link, _i, _al, entsize in sections:
        if sh_type != 2 or entsize != 24:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for k in range(off, off + size, 24):
            st_name, _info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, k)
            if not shndx or not st_name:
                continue
            end = data.index(b"\0", stroff + st_name)
            sym = data[stroff + st_name : end]
            if sym in wanted:
                found[wanted[sym]] = value
    return found
