"""The error a control-protocol call answers with (no trio: blocking clients use it too)."""

from __future__ import annotations

from gemfs.control.protocol import errno_code, errno_name


class CallError(Exception):
    """A call answered with an error (errno name + message), or one that could not be made."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message

    @property
    def code(self) -> int:
        try:
            return errno_code(self.errno)
        except ValueError:
            return 5  # EIO

    @classmethod
    def from_code(cls, code: int, message: str) -> CallError:
        return cls(errno_name(code), message)


__all__ = ["CallError"]
