"""gemfs: GEM objects on a FUSE mount, with pins, migration and compaction."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gemfs")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.1.0+src"
