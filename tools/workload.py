"""Workload files: TOML that a person can read and edit, parsed into typed frozen dataclasses.

A workload is a pool, a seed, the compactor's settings and a list of phases played in order::

    name = "compaction-test"        # optional; defaults to the file name
    description = "..."             # optional
    pool = "512MiB"                 # a multiple of 4MiB (one order-10 block); with
                                    #   ``gemfs run --mount M``, M's pool is used instead
    seed = 1                        # the same seed plays the same workload (default 0)
    page_size = 4096                # optional; must be 4096 (the model's frame size)

    [costs]                         # optional: override the cost model (gemfs.mm.costs),
    copy_page_us = 2.0              #   modelled µs per operation (>= 0), e.g. flush_page_us = 10

    [driver]                        # optional: GEM pages' migrate type instead of the design's
    migratetype = "movable"         #   unmovable | movable | reclaimable (an ablation)
    policy = "i915-2016"            #   the migrate callback: wait-idle (default) | i915-2016 |
                                    #   per-page-flush (sets flush_page_us unless [costs] does)
    display = "off"                 #   on (default) | off: a lit display keeps the GPU "in
                                    #   use" for runtime PM (read by i915-2016's callback)

    [design]                        # optional: knobs of three designs (gemfs/mm/region.py,
    movablecore = "50%"             #   gemfs/mm/ttm.py). longterm-pin: the movable region, a
                                    #   size or a share of the pool (movablecore=); default 50%
    confine_granule = "8MiB"        #   confine: the step its region grows and shrinks by, a
                                    #   multiple of 4MiB; default 1GiB, or pool/32 when smaller
    ttm_pool = "0"                  #   pinned-ttm: what TTM's page pools may hold, a size or a
                                    #   share of the pool (ttm.page_pool_size=); default 50%
                                    #   (amdgpu's write-combined BOs); "0": no pooling (cached
                                    #   BOs on x86, every BO on arm64)

    [compactor]                     # kcompactd's settings (all optional)
    proactiveness = 20              # 0..100 (vm.compaction_proactiveness); 0: none
    interval_ms = 500               # how often it wakes
    order = -1                      # >= 0: it also compacts for this order when none is free

    [[phase]]
    kind = "create"
    ...

``[costs]`` entries (modelled µs, defaults and sources in gemfs/mm/costs.py): ``copy_page_us``,
``gtt_pte_us``, ``callback_us``, ``flush_page_us``, ``pin_call_us``, ``pin_page_us``,
``unpin_call_us``, ``unpin_page_us``, ``refault_page_us``, ``scan_page_us``, ``alloc_fast_us``.

Phase kinds and their keys (every phase also takes an optional ``name`` for the timeline):

=============  =================================================================================
kind           keys
=============  =================================================================================
create         GEM objects. ``tag``; ``count`` or ``fill`` (fraction of the free memory);
               ``size`` (below); ``bind`` (default false: the GPU binds them, pinned until freed);
               ``start_offset`` (placement, below)
page-cache     Unpinned movable files (the rest of the system; they can always move; dropped
               oldest first when an allocation needs room). ``tag``; ``count`` or ``fill``;
               ``size`` (default 1MiB); ``start_offset``
gpu            GPU batches. ``tag`` (a tag or a list); ``fraction`` (of those objects, per batch;
               default 1) or ``count``; ``duration_ms`` (default 1); ``access`` (read | write;
               default read); ``repeat`` (batches, default 1); ``interval_ms`` (time between
               batch submissions, default 0); ``keep_ms`` (default 0: a frame loop -- the last
               batch is resubmitted every ``interval_ms`` for this much more modelled time
               while the next phases run, so the driver's migrate callbacks find its objects
               and the device busy; the loop's batches are busy time only, reading and writing
               nothing; a later loop replaces it; a loop object that loses its GTT is
               re-faulted by the loop at the next phase and rejoins it)
free           ``tag``; one of ``every`` (every Nth in creation order, from ``offset``, default
               0), ``fraction`` (random), ``count`` (the oldest N), ``all = true``
noise          Kernel allocations of another migrate type. ``tag``; ``type`` (unmovable |
               reclaimable | movable); ``order`` (default 0); ``count`` (allocations) or
               ``pages``
probe          High-order allocations with direct compaction. ``order`` (default 9; above 10,
               i.e. larger than a buddy block, the kernel's alloc_contig_range: up to 18 =
               1 GiB) or ``size`` (``"16MiB"``, ``"1GiB"``: a power of two); ``count`` (a
               number, default 1, or "all": until one fails); ``repeat`` (default 1);
               ``interval_ms`` (default 0); ``hold`` (default false; true: keep the blocks
               until the next probe phase without hold); ``gfp`` (default "thp": a THP fault,
               no retry, no kswapd; "hugetlb": an nr_hugepages allocation, retries at
               SYNC_LIGHT and wakes kswapd, so kcompactd works for the order; "kernel")
compact        Explicit compaction of the whole pool (``echo 1 > compact_memory``)
wait           ``ms``: time passes; the compactor wakes every ``interval_ms``
repeat         ``times``; ``[[phase.do]]`` tables: the phases to repeat
=============  =================================================================================

Tags: ``create``, ``page-cache`` and ``noise`` phases create a tag; ``gpu`` and ``free`` name one
that an earlier phase created (inside a ``repeat`` body, or one that body creates). A tag no
phase created is an error. So is a phase whose ``count`` allocations (at their smallest size)
cannot fit the pool at once: the pool is too small for the workload.

Sizes are ``"64KiB"``-style strings or byte counts, or an inline table with ``dist``:
``{ dist = "uniform", min = "4KiB", max = "1MiB" }``,
``{ dist = "lognormal", median = "64KiB", sigma = 1.0, min = "4KiB", max = "64MiB" }``,
``{ dist = "mesa", median = "64KiB", sigma = 1.5, max = "8MiB" }`` (log-normal rounded up to
Mesa's bucket sizes: 4, 8, 12 KiB, then four buckets per power of two up to 64 MiB; ``min``
and ``max`` clip the draw before rounding), ``{ dist = "fixed", size = "1MiB" }``, or
``{ dist = "choice", sizes = ["4MiB", "16MiB"], weights = [3, 1] }``. ``sigma`` defaults to 1,
``min`` to 4KiB and ``max`` to 64MiB (or the pool, when smaller); ``weights`` to equal.

Placement: ``start_offset = N`` on a ``create`` or ``page-cache`` phase hands out N single
movable pages (kept, tag ``<tag>.offset``) just before the phase's first allocation, so that its
stream of consecutive frames starts N pages further on — e.g. N pages past a pageblock boundary
when the free memory before it starts on one. The phase is then played as a ``repeat`` of once
over that ``noise`` phase and itself.

Anything unknown or out of range is a :class:`WorkloadError` naming the file, the line and what
was expected. tomllib gives no line numbers, so :class:`_Locator` finds keys in the source text.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from driver.gem import DriverPolicy
from gemfs.mm.contig import MAX_CONTIG_ORDER
from gemfs.mm.costs import CostTable
from gemfs.mm.page_alloc import AllocKind
from gemfs.mm.pool import check_pool_size
from gemfs.mm.region import confine_granule_pages, movablecore_pages
from gemfs.mm.ttm import ttm_pool_pages
from gemfs.mm.types import MAX_ORDER, PAGE_SIZE, MigrateType, format_size, parse_size

I64 = npt.NDArray[np.int64]
KeyPath = tuple[str | int, ...]

MIN_OBJECT = PAGE_SIZE
MESA_MAX = 64 << 20


class WorkloadError(Exception):
    """A workload file that cannot be played: ``file:line: what is wrong (what was expected)``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


# -- size distributions ------------------------------------------------------------------------
def _pages_up(nbytes: I64) -> I64:
    """Round byte sizes up to whole pages (an object is at least one page)."""
    return np.maximum(1, -(-nbytes // PAGE_SIZE)) * PAGE_SIZE


def mesa_buckets(limit: int = MESA_MAX) -> tuple[int, ...]:
    """Mesa's buffer-cache bucket sizes: 4, 8, 12 KiB, then four per power of two up to limit."""
    sizes = [4 << 10, 8 << 10, 12 << 10]
    base = 16 << 10
    while base <= limit:
        for k in range(4):
            size = base + k * base // 4
            if size <= limit:
                sizes.append(size)
        base *= 2
    return tuple(sizes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fixed:
    size: int

    def sample(self, rng: np.random.Generator, n: int) -> I64:
        return np.full(n, _pages_up(np.array([self.size]))[0], dtype=np.int64)

    @property
    def max_size(self) -> int:
        return self.size


@dataclass(frozen=True, slots=True, kw_only=True)
class Uniform:
    min: int
    max: int

    def sample(self, rng: np.random.Generator, n: int) -> I64:
        return _pages_up(rng.integers(self.min, self.max, size=n, endpoint=True, dtype=np.int64))

    @property
    def max_size(self) -> int:
        return self.max


@dataclass(frozen=True, slots=True, kw_only=True)
class LogNormal:
    median: int
    sigma: float
    min: int = MIN_OBJECT
    max: int = MESA_MAX

    def draw(self, rng: np.random.Generator, n: int) -> I64:
        raw = rng.lognormal(math.log(self.median), self.sigma, size=n)
        return np.clip(raw, self.min, self.max).astype(np.int64)

    def sample(self, rng: np.random.Generator, n: int) -> I64:
        return _pages_up(self.draw(rng, n))

    @property
    def max_size(self) -> int:
        return self.max


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesa:
    """Log-normal sizes rounded up to Mesa's bucket sizes (iris/anv buffer cache)."""

    median: int
    sigma: float
    min: int = MIN_OBJECT
    max: int = MESA_MAX

    def sample(self, rng: np.random.Generator, n: int) -> I64:
        raw = LogNormal(median=self.median, sigma=self.sigma, min=self.min, max=self.max)
        buckets = np.array(mesa_buckets(), dtype=np.int64)
        pos = np.searchsorted(buckets, raw.draw(rng, n), side="left")
        return buckets[np.minimum(pos, len(buckets) - 1)]

    @property
    def max_size(self) -> int:
        buckets = mesa_buckets()
        return next((b for b in buckets if b >= self.max), buckets[-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    def sample(self, rng: np.random.Generator, n: int) -> I64:
        p = np.array(self.weights, dtype=np.float64)
        picks = rng.choice(len(self.sizes), size=n, p=p / p.sum())
        return _pages_up(np.array(self.sizes, dtype=np.int64)[picks])

    @property
    def max_size(self) -> int:
        return max(self.sizes)


SizeDist = Fixed | Uniform | LogNormal | Mesa | Choice


# -- phases ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Amount:
    """How many: a count, or a fraction of the memory free when the phase starts."""

    count: int | None = None
    fill: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Create:
    name: str
    tag: str
    amount: Amount
    size: SizeDist
    bind: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PageCache:
    name: str
    tag: str
    amount: Amount
    size: SizeDist


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    name: str
    tags: tuple[str, ...]
    fraction: float = 1.0
    count: int | None = None
    duration_s: float = 0.0
    write: bool = False
    repeat: int = 1
    interval_s: float = 0.0
    keep_s: float = 0.0  # the last batch goes on every interval_s for this long (a frame loop)


@dataclass(frozen=True, slots=True, kw_only=True)
class Free:
    name: str
    tag: str
    every: int | None = None
    offset: int = 0
    fraction: float | None = None
    count: int | None = None
    all: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Noise:
    name: str
    tag: str
    migratetype: MigrateType
    order: int = 0
    count: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    name: str
    order: int = 9
    count: int | Literal["all"] = 1
    repeat: int = 1
    interval_s: float = 0.0
    hold: bool = False
    gfp: str = "thp"  # the slow path's rules: thp (a THP fault), hugetlb, kernel


@dataclass(frozen=True, slots=True, kw_only=True)
class Compact:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Wait:
    name: str
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Repeat:
    name: str
    times: int
    phases: tuple[Phase, ...]


Phase = Create | PageCache | Gpu | Free | Noise | Probe | Compact | Wait | Repeat


def ticks(phase: Phase) -> int:
    """Progress units a phase takes: one per batch / probe round, one for the others."""
    match phase:
        case Repeat(times=times, phases=phases):
            return times * sum(ticks(p) for p in phases)
        case Gpu(repeat=n) | Probe(repeat=n):
            return n
        case _:
            return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Compactor:
    proactiveness: int = 20
    interval_s: float = 0.5
    order: int = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    name: str
    description: str
    path: str
    pool: int  # bytes
    seed: int
    compactor: Compactor
    phases: tuple[Phase, ...]
    costs: tuple[tuple[str, float], ...] = ()  # [costs] overrides of gemfs.mm.costs.CostTable
    # [driver] migratetype: the GEM pages' migrate type instead of the design's (an ablation:
    # e.g. pinned GEM pages in MOVABLE or UNMOVABLE pageblocks instead of i915's RECLAIMABLE)
    gem_migratetype: MigrateType | None = None
    # [driver] policy: what the driver's migrate callback does (driver.gem.DriverPolicy)
    driver_policy: DriverPolicy = DriverPolicy.WAIT_IDLE
    # [driver] display: is a display lit (a runtime-PM wakeref held all along)? off: the GPU is
    # "in use" only while it works and shortly after (driver.gem.GemDriver.rpm_in_use)
    display_on: bool = True
    # [design] movablecore / confine_granule: the regions of longterm-pin and confine
    # (gemfs.mm.region; None: the default)
    movablecore: str | None = None
    confine_granule: str | None = None
    # [design] ttm_pool: what pinned-ttm's page pools may hold (gemfs.mm.ttm; None: the default)
    ttm_pool: str | None = None

    def with_driver_policy(self, policy: DriverPolicy) -> Workload:
        """The workload with another driver policy; the cost-table entries the policy implies
        (per-page-flush: flush_page_us) replace its old policy's, unless [costs] set them."""
        old = dict(self.driver_policy.costs)
        costs = {k: v for k, v in self.costs if not (k in old and v == old[k])}
        costs = {**policy.costs, **costs}
        return dataclasses.replace(self, driver_policy=policy, costs=tuple(costs.items()))

    @property
    def pool_pages(self) -> int:
        return self.pool // PAGE_SIZE

    @property
    def ticks(self) -> int:
        return sum(ticks(p) for p in self.phases)

    @property
    def has_compact(self) -> bool:
        return any(isinstance(p, Compact) for p in walk(self.phases))


def walk(phases: Sequence[Phase]) -> Iterator[Phase]:
    """Every phase, repeat bodies included (once each)."""
    for p in phases:
        yield p
        if isinstance(p, Repeat):
            yield from walk(p.phases)


# -- locating keys in the source text ----------------------------------------------------------
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=(.*)$")
_INLINE_KEY = re.compile(r"([A-Za-z0-9_-]+)\s*=")


def _split_key(key: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", key)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _strip_strings(text: str) -> str:
    """The text with string contents and comments removed (to count brackets)."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        else:
            out.append(c)
        i += 1
    return "".join(out)


class _Locator:
    """Maps key paths like ``("phase", 2, "size")`` to the line where they are written."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        arrays: dict[KeyPath, int] = {}  # array-of-tables path -> index of its last element
        table: KeyPath = ()
        depth = 0  # open brackets of a multi-line array value
        in_string = ""
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if in_string:
                if raw.count(in_string) % 2:
                    in_string = ""
                continue
            if depth:
                s = _strip_strings(raw)
                depth += s.count("[") + s.count("{") - s.count("]") - s.count("}")
                continue
            if m := _HEADER.match(raw):
                names = _split_key(m.group(2))
                path: KeyPath = ()
                for i, name in enumerate(names):
                    path = (*path, name)
                    if i < len(names) - 1 and path in arrays:
                        path = (*path, arrays[path])
                if m.group(1) == "[[":
                    arrays[path] = arrays.get(path, -1) + 1
                    self.lines.setdefault(path, lineno)
                    path = (*path, arrays[path])
                table = path
                self.lines[table] = lineno
                continue
            if m := _KEY.match(raw):
                key = (*table, *_split_key(m.group(1)))
                self.lines[key] = lineno
                value = m.group(2)
                for q in ('"""', "'''"):
                    if value.count(q) % 2:
                        in_string = q
                s = _strip_strings(value)
                if "{" in s:
                    for inner in _INLINE_KEY.findall(s[s.index("{") :]):
                        self.lines.setdefault((*key, inner), lineno)
                depth = max(0, s.count("[") + s.count("{") - s.count("]") - s.count("}"))

    def line(self, path: KeyPath) -> int:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 1


# -- reading tables ----------------------------------------------------------------------------
T = TypeVar("T")
_MISSING = object()


class _Ctx:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.locator = _Locator(text)

    def error(self, path: KeyPath, message: str) -> WorkloadError:
        return WorkloadError(self.file, self.locator.line(path), message)


def _type_name(value: object) -> str:
    match value:
        case bool():
            return "a boolean"
        case int():
            return "an integer"
        case float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case dict():
            return "a table"
        case _:
            return type(value).__name__


class _Table:
    """One TOML table being read: take keys with types and checks, then reject the rest."""

    def __init__(self, ctx: _Ctx, data: Mapping[str, object], path: KeyPath, where: str) -> None:
        self.ctx = ctx
        self.data = data
        self.path = path
        self.where = where

    def error(self, key: str | None, message: str) -> WorkloadError:
        path = self.path if key is None else (*self.path, key)
        return self.ctx.error(path, f"{self.where}: {message}")

    def allow(self, keys: Sequence[str]) -> None:
        for key in self.data:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                expected = ", ".join(sorted(keys))
                raise self.error(key, f"unknown key {key!r} ({hint}expected one of: {expected})")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: object = _MISSING) -> object:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.error(None, f"missing required key {key!r}")
        return default

    def _typed(self, key: str, value: object, kind: type[T], expected: str) -> T:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # type: ignore[return-value]
        if not ok:
            raise self.error(key, f"{key} must be {expected}, not {_type_name(value)} {value!r}")
        return value  # type: ignore[return-value]

    def str_(self, key: str, default: str | None = None) -> str:
        value = self.raw(key, _MISSING if default is None else default)
        return self._typed(key, value, str, "a string")

    def bool_(self, key: str, default: bool) -> bool:
        return self._typed(key, self.raw(key, default), bool, "true or false")

    def int_(
        self, key: str, default: int | None = None, *, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self._typed(
            key, self.raw(key, _MISSING if default is None else default), int, "an integer"
        )
        return self._range(key, value, lo, hi)

    def float_(
        self,
        key: str,
        default: float | None = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
    ) -> float:
        value = self._typed(
            key, self.raw(key, _MISSING if default is None else default), float, "a number"
        )
        if not math.isfinite(value):
            raise self.error(key, f"{key} must be a finite number, not {value!r}")
        if lo_open and lo is not None and value <= lo:
            raise self.error(key, f"{key} must be greater than {lo:g}, not {value:g}")
        return self._range(key, value, None if lo_open else lo, hi)

    def _range(self, key: str, value: T, lo: float | None, hi: float | None) -> T:
        v = float(value)  # type: ignore[arg-type]
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                want = f"between {lo:g} and {hi:g}"
            elif lo is not None:
                want = f"at least {lo:g}"
            else:
                want = f"at most {hi:g}"
            raise self.error(key, f"{key} must be {want}, not {value!r}")
        return value

    def size(self, key: str, default: str | int | None = None, *, value: object = _MISSING) -> int:
        raw = (
            self.raw(key, _MISSING if default is None else default) if value is _MISSING else value
        )
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise self.error(
                key,
                f'{key} must be a size like "64KiB" or a byte count, not {_type_name(raw)} {raw!r}',
            )
        try:
            nbytes = parse_size(raw)
        except ValueError as e:
            raise self.error(key, f"{key}: {e}") from None
        if nbytes <= 0:
            raise self.error(key, f"{key} must be a positive size, not {raw!r}")
        return nbytes

    def choice(self, key: str, options: Sequence[str], default: str | None = None) -> str:
        value = self.str_(key, default)
        if value not in options:
            expected = " | ".join(options)
            raise self.error(key, f"{key} must be one of {expected}, not {value!r}")
        return value

    def table(self, key: str, where: str) -> _Table:
        value = self.raw(key)
        if not isinstance(value, dict):
            raise self.error(key, f"{key} must be a table, not {_type_name(value)} {value!r}")
        return _Table(self.ctx, value, (*self.path, key), where)

    def one_of(self, keys: Sequence[str]) -> str:
        given = [k for k in keys if k in self.data]
        if len(given) != 1:
            listed = ", ".join(repr(k) for k in keys)
            if not given:
                raise self.error(None, f"missing required key: one of {listed}")
            raise self.error(
                given[1], f"give only one of {listed} (found {given[0]!r} and {given[1]!r})"
            )
        return given[0]


# -- the schema --------------------------------------------------------------------------------
GFP_KINDS = tuple(k.value for k in AllocKind)
KINDS = ("create", "page-cache", "gpu", "free", "noise", "probe", "compact", "wait", "repeat")
_DISTS = ("fixed", "uniform", "lognormal", "mesa", "choice")


def _size_dist(t: _Table, key: str, default: str | None, pool: int) -> SizeDist:
    raw = t.raw(key, _MISSING if default is None else default)
    if not isinstance(raw, dict):
        dist: SizeDist = Fixed(size=t.size(key, value=raw))
    else:
        s = _Table(t.ctx, raw, (*t.path, key), f"{t.where}: {key}")
        kind = s.choice("dist", _DISTS)
        match kind:
            case "fixed":
                s.allow(("dist", "size"))
                dist = Fixed(size=s.size("size"))
            case "uniform":
                s.allow(("dist", "min", "max"))
                lo, hi = s.size("min"), s.size("max")
                if hi < lo:
                    raise s.error(
                        "max", f"max ({format_size(hi)}) is below min ({format_size(lo)})"
                    )
                dist = Uniform(min=lo, max=hi)
            case "lognormal" | "mesa":
                s.allow(("dist", "median", "sigma", "min", "max"))
                median = s.size("median")
                sigma = s.float_("sigma", 1.0, lo=0.0, hi=5.0)
                lo = s.size("min", MIN_OBJECT)
                hi = s.size("max", min(MESA_MAX, pool))
                if hi < lo:
                    raise s.error(
                        "max", f"max ({format_size(hi)}) is below min ({format_size(lo)})"
                    )
                cls = LogNormal if kind == "lognormal" else Mesa
                dist = cls(median=median, sigma=sigma, min=lo, max=hi)
            case _:
                s.allow(("dist", "sizes", "weights"))
                sizes_raw = s.raw("sizes")
                if not isinstance(sizes_raw, list) or not sizes_raw:
                    raise s.error(
                        "sizes", f"sizes must be a non-empty array of sizes, not {sizes_raw!r}"
                    )
                sizes = tuple(s.size("sizes", value=v) for v in sizes_raw)
                weights_raw = s.raw("weights", [1.0] * len(sizes))
                if not isinstance(weights_raw, list) or len(weights_raw) != len(sizes):
                    raise s.error("weights", f"weights must be an array of {len(sizes)} numbers")
                weights = tuple(s._typed("weights", w, float, "a number") for w in weights_raw)
                if any(w < 0 for w in weights) or sum(weights) <= 0:
                    raise s.error("weights", "weights must be non-negative with a positive sum")
                dist = Choice(sizes=sizes, weights=weights)
    if dist.max_size > pool:
        raise t.error(
            key,
            f"{key}: objects up to {format_size(dist.max_size)} do not fit the pool "
            f"({format_size(pool)})",
        )
    return dist


def _min_size(dist: SizeDist) -> int:
    """The smallest object a distribution can give, in whole pages."""
    match dist:
        case Fixed(size=size):
            low = size
        case Uniform(min=low) | LogNormal(min=low):
            pass
        case Mesa(min=low):
            low = next(b for b in mesa_buckets() if b >= low)
        case Choice(sizes=sizes):
            low = min(sizes)
    return -(-low // PAGE_SIZE) * PAGE_SIZE


def _check_fits(t: _Table, what: str, count: int, nbytes: int, pool: int) -> None:
    """A phase whose ``count`` allocations cannot all be in the pool at once: the pool is too
    small for the workload (says how much it would take)."""
    if count * nbytes > pool:
        key = "count" if t.has("count") else "pages"
        raise t.error(
            key,
            f"{count} {what} of at least {format_size(nbytes)} need "
            f"{format_size(count * nbytes)}; the pool is {format_size(pool)}, too small for "
            "this workload (make the pool larger or the count smaller)",
        )


_CREATES_TAGS = (Create, PageCache, Noise)


def _created_tags(phases: Sequence[Phase]) -> set[str]:
    return {p.tag for p in walk(phases) if isinstance(p, _CREATES_TAGS)}


def _check_phases(
    ctx: _Ctx,
    raw: Sequence[object],
    phases: Sequence[Phase],
    path: KeyPath,
    where: str,
    pool: int,
    known: set[str],
) -> None:
    """Checks across phases, after each parsed on its own: every tag a phase names was created
    by an earlier phase (in a repeat body: or anywhere in that body, for the next round), and no
    phase asks for more than the pool can hold at once."""
    for i, (data, phase) in enumerate(zip(raw, phases, strict=True)):
        assert isinstance(data, dict)
        p = (*path, i)
        t = _Table(ctx, data, p, f"{where} {i + 1} ({data['kind']})")
        match phase:
            case Create(amount=Amount(count=int(n)), size=size):
                _check_fits(t, "objects", n, _min_size(size), pool)
            case PageCache(amount=Amount(count=int(n)), size=size):
                _check_fits(t, "files", n, _min_size(size), pool)
            case Noise(count=n, order=order):
                _check_fits(t, "allocations", n, PAGE_SIZE << order, pool)
            case Gpu(tags=tags):
                for tag in tags:
                    _check_tag(t, tag, known)
            case Free(tag=tag):
                _check_tag(t, tag, known)
            case Repeat(phases=body) if "do" not in data:
                # A create/page-cache phase with start_offset, played as a repeat of once over
                # its offset pages and itself: both come from this one table.
                known |= _created_tags(body)
            case Repeat(phases=body):
                inner = known | _created_tags(body)
                _check_phases(ctx, data["do"], body, (*p, "do"), f"{t.where} > do", pool, inner)
                known |= inner
        if isinstance(phase, _CREATES_TAGS):
            known.add(phase.tag)


def _check_tag(t: _Table, tag: str, known: set[str]) -> None:
    if tag in known:
        return
    near = difflib.get_close_matches(tag, sorted(known), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    made = ", ".join(sorted(known)) or "none yet"
    raise t.error(
        "tag",
        f"tag {tag!r} is not created by any phase before this one "
        f"(create, page-cache and noise phases create tags; so far: {made}){hint}",
    )


def _amount(t: _Table) -> Amount:
    if t.one_of(("count", "fill")) == "count":
        return Amount(count=t.int_("count", lo=1))
    return Amount(fill=t.float_("fill", lo=0.0, hi=1.0, lo_open=True))


def _tags(t: _Table) -> tuple[str, ...]:
    raw = t.raw("tag")
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        return tuple(str(x) for x in raw)
    raise t.error("tag", f"tag must be a string or a non-empty array of strings, not {raw!r}")


_COMMON = ("kind", "name")
_KEYS: dict[str, tuple[str, ...]] = {
    "create": ("tag", "count", "fill", "size", "bind", "start_offset"),
    "page-cache": ("tag", "count", "fill", "size", "start_offset"),
    "gpu": (
        "tag",
        "fraction",
        "count",
        "duration_ms",
        "access",
        "repeat",
        "interval_ms",
        "keep_ms",
    ),
    "free": ("tag", "every", "offset", "fraction", "count", "all"),
    "noise": ("tag", "type", "order", "count", "pages"),
    "probe": ("order", "size", "count", "repeat", "interval_ms", "hold", "gfp"),
    "compact": (),
    "wait": ("ms",),
    "repeat": ("times", "do"),
}


def _placed(t: _Table, phase: Create | PageCache, pool: int) -> Phase:
    """``start_offset``: the phase preceded by that many single movable pages (see the doc)."""
    offset = t.int_("start_offset", 0, lo=0, hi=pool // PAGE_SIZE)
    if not offset:
        return phase
    noise = Noise(
        name=f"{phase.name}: start {offset} pages in",
        tag=f"{phase.tag}.offset",
        migratetype=MigrateType.MOVABLE,
        order=0,
        count=offset,
    )
    return Repeat(name=phase.name, times=1, phases=(noise, phase))


def _phase(ctx: _Ctx, data: object, path: KeyPath, where: str, pool: int) -> Phase:
    if not isinstance(data, dict):
        raise ctx.error(path, f"{where} must be a table, not {_type_name(data)}")
    t = _Table(ctx, data, path, where)
    kind = t.choice("kind", KINDS)
    t.where = f"{where} ({kind})"
    t.allow((*_COMMON, *_KEYS[kind]))
    name = t.str_("name", kind)
    match kind:
        case "create":
            create = Create(
                name=name,
                tag=t.str_("tag"),
                amount=_amount(t),
                size=_size_dist(t, "size", None, pool),
                bind=t.bool_("bind", False),
            )
            return _placed(t, create, pool)
        case "page-cache":
            cache = PageCache(
                name=name,
                tag=t.str_("tag"),
                amount=_amount(t),
                size=_size_dist(t, "size", "1MiB", pool),
            )
            return _placed(t, cache, pool)
        case "gpu":
            fraction, count = 1.0, None
            if t.has("fraction") and t.has("count"):
                t.one_of(("fraction", "count"))
            if t.has("count"):
                count = t.int_("count", lo=1)
            else:
                fraction = t.float_("fraction", 1.0, lo=0.0, hi=1.0, lo_open=True)
            interval_s = t.float_("interval_ms", 0.0, lo=0.0, hi=3_600_000.0) / 1000
            keep_s = t.float_("keep_ms", 0.0, lo=0.0, hi=3_600_000.0) / 1000
            if keep_s and not interval_s:
                raise t.error("keep_ms", "keep_ms needs interval_ms > 0 (the loop's period)")
            return Gpu(
                name=name,
                tags=_tags(t),
                fraction=fraction,
                count=count,
                duration_s=t.float_("duration_ms", 1.0, lo=0.0, hi=3_600_000.0) / 1000,
                write=t.choice("access", ("read", "write"), "read") == "write",
                repeat=t.int_("repeat", 1, lo=1, hi=1_000_000),
                interval_s=interval_s,
                keep_s=keep_s,
            )
        case "free":
            which = t.one_of(("every", "fraction", "count", "all"))
            if t.has("offset") and which != "every":
                raise t.error("offset", "offset goes with every")
            tag = t.str_("tag")
            match which:
                case "every":
                    every = t.int_("every", lo=1)
                    offset = t.int_("offset", 0, lo=0, hi=every - 1)
                    return Free(name=name, tag=tag, every=every, offset=offset)
                case "fraction":
                    fraction = t.float_("fraction", lo=0.0, hi=1.0, lo_open=True)
                    return Free(name=name, tag=tag, fraction=fraction)
                case "count":
                    return Free(name=name, tag=tag, count=t.int_("count", lo=1))
                case _:
                    if not t.bool_("all", True):
                        raise t.error("all", "all must be true (leave it out to free fewer)")
                    return Free(name=name, tag=tag, all=True)
        case "noise":
            mt_name = t.choice("type", tuple(m.name.lower() for m in MigrateType))
            order = t.int_("order", 0, lo=0, hi=MAX_ORDER)
            if t.one_of(("count", "pages")) == "count":
                count = t.int_("count", lo=1)
            else:
                pages = t.int_("pages", lo=1 << order)
                count = pages >> order
            return Noise(
                name=name,
                tag=t.str_("tag"),
                migratetype=MigrateType.parse(mt_name),
                order=order,
                count=count,
            )
        case "probe":
            count_: int | Literal["all"] = "all"
            raw_count = t.raw("count", 1)
            if isinstance(raw_count, str) and raw_count != "all":
                raise t.error("count", f'count must be a number or "all", not {raw_count!r}')
            if raw_count != "all":
                count_ = t.int_("count", 1, lo=1)
            if t.has("size") and t.has("order"):
                raise t.error("size", "give order or size, not both")
            if t.has("size"):  # e.g. "2MiB", "16MiB", "1GiB": a power of two pages
                nbytes = t.size("size")
                pages = nbytes // PAGE_SIZE
                if nbytes % PAGE_SIZE or pages & (pages - 1) or not 2 <= pages <= 1 << 18:
                    raise t.error("size", "size must be a power of two from 8KiB to 1GiB")
                order = pages.bit_length() - 1
            else:
                order = t.int_("order", 9, lo=1, hi=MAX_CONTIG_ORDER)
            if 1 << order > pool // PAGE_SIZE:
                raise t.error("size" if t.has("size") else "order", "larger than the pool")
            return Probe(
                name=name,
                order=order,
                count=count_,
                repeat=t.int_("repeat", 1, lo=1, hi=1_000_000),
                interval_s=t.float_("interval_ms", 0.0, lo=0.0, hi=3_600_000.0) / 1000,
                hold=t.bool_("hold", False),
                gfp=t.choice("gfp", GFP_KINDS, "thp"),
            )
        case "compact":
            return Compact(name=name)
        case "wait":
            return Wait(
                name=name, seconds=t.float_("ms", lo=0.0, hi=86_400_000.0, lo_open=True) / 1000
            )
        case _:
            times = t.int_("times", lo=1, hi=100_000)
            body = t.raw("do")
            if not isinstance(body, list) or not body:
                raise t.error("do", "do must be one or more [[phase.do]] tables")
            phases = tuple(
                _phase(ctx, d, (*path, "do", i), f"{t.where} > do {i + 1}", pool)
                for i, d in enumerate(body)
            )
            return Repeat(name=name, times=times, phases=phases)


def parse_workload(text: str, file: str = "<workload>", pool: int | None = None) -> Workload:
    """Parse and validate a workload; raise :class:`WorkloadError` with file and line.

    ``pool``: play on a pool of this size instead of the file's (an existing mount's); the
    phases are checked against it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        line = int(m.group(1)) if m else 1
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) if m else str(e)
        raise WorkloadError(file, line, f"not valid TOML: {msg}") from None
    return workload_from_data(data, file, text, pool)


def workload_from_data(
    data: dict[str, object], file: str, text: str = "", pool: int | None = None
) -> Workload:
    """Validate already-parsed TOML data (e.g. with a sweep's parameters applied) as a workload;
    ``text`` is the file's source, for the line numbers of errors; ``pool`` as for
    :func:`parse_workload`."""
    ctx = _Ctx(file, text)
    top = _Table(ctx, data, (), "workload")
    top.allow(
        (
            "name",
            "description",
            "pool",
            "seed",
            "page_size",
            "compactor",
            "costs",
            "driver",
            "design",
            "phase",
        )
    )
    name = top.str_("name", Path(file).stem or "workload")
    description = top.str_("description", "")
    file_pool = top.size("pool")
    try:
        check_pool_size(file_pool)
    except ValueError as e:
        raise top.error("pool", str(e)) from None
    pool = file_pool if pool is None else pool
    if top.has("page_size") and top.int_("page_size") != PAGE_SIZE:
        raise top.error("page_size", f"page_size must be {PAGE_SIZE} (the model's frame size)")
    seed = top.int_("seed", 0, lo=0)
    compactor = Compactor()
    if top.has("compactor"):
        c = top.table("compactor", "[compactor]")
        c.allow(("proactiveness", "interval_ms", "order"))
        compactor = Compactor(
            proactiveness=c.int_("proactiveness", 20, lo=0, hi=100),
            interval_s=c.float_("interval_ms", 500.0, lo=1.0, hi=3_600_000.0) / 1000,
            order=c.int_("order", -1, lo=-1, hi=MAX_ORDER),
        )
    costs: tuple[tuple[str, float], ...] = ()
    if top.has("costs"):
        ct = top.table("costs", "[costs]")
        known = tuple(f.name for f in dataclasses.fields(CostTable))
        ct.allow(known)
        costs = tuple((k, ct.float_(k, lo=0.0, hi=1e9)) for k in known if ct.has(k))
    gem_mt: MigrateType | None = None
    policy = DriverPolicy.WAIT_IDLE
    display_on = True
    if top.has("driver"):
        dt = top.table("driver", "[driver]")
        dt.allow(("migratetype", "policy", "display"))
        if dt.has("migratetype"):
            gem_mt = MigrateType.parse(
                dt.choice("migratetype", tuple(m.name.lower() for m in MigrateType))
            )
        if dt.has("policy"):
            policy = DriverPolicy.parse(dt.choice("policy", tuple(p.value for p in DriverPolicy)))
        if dt.has("display"):
            display_on = dt.choice("display", ("on", "off")) == "on"
    movablecore = confine_granule = ttm_pool = None
    if top.has("design"):
        dz = top.table("design", "[design]")
        dz.allow(("movablecore", "confine_granule", "ttm_pool"))
        nr_pages = pool // PAGE_SIZE
        knobs: dict[str, str | None] = {}
        for key, check in (
            ("movablecore", movablecore_pages),
            ("confine_granule", confine_granule_pages),
            ("ttm_pool", ttm_pool_pages),
        ):
            knobs[key] = dz.str_(key) if dz.has(key) else None
            if (value := knobs[key]) is not None:
                try:
                    check(value, nr_pages)
                except ValueError as e:
                    raise dz.error(key, str(e)) from None
        movablecore, confine_granule = knobs["movablecore"], knobs["confine_granule"]
        ttm_pool = knobs["ttm_pool"]
    raw_phases = top.raw("phase")
    if not isinstance(raw_phases, list) or not raw_phases:
        raise top.error("phase", "phase must be one or more [[phase]] tables")
    phases = tuple(
        _phase(ctx, p, ("phase", i), f"phase {i + 1}", pool) for i, p in enumerate(raw_phases)
    )
    _check_phases(ctx, raw_phases, phases, ("phase",), "phase", pool, set())
    return Workload(
        name=name,
        description=description,
        path=file,
        pool=pool,
        seed=seed,
        compactor=compactor,
        phases=phases,
        costs=costs,
        gem_migratetype=gem_mt,
        display_on=display_on,
        movablecore=movablecore,
        confine_granule=confine_granule,
        ttm_pool=ttm_pool,
    ).with_driver_policy(policy)


def load_workload(path: str | Path, pool: int | None = None) -> Workload:
    """Read and parse a workload file (``pool``: see :func:`parse_workload`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(str(p), 1, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise WorkloadError(str(p), 1, "not a UTF-8 text file") from None
    return parse_workload(text, str(p), pool)
