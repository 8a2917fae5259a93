"""Fleets: N simulated machines whose workload, pool size and uptime are drawn from a spec.

A fleet spec::

    machines = 40
    seed = 2023                       # the draws (the same seed draws the same fleet)
    designs = ["pinned", "shmem-hook"]  # every machine is played under each design
    [draw]                            # drawn for every machine
    pool = { dist = "choice", values = ["128MiB", "256MiB"], weights = [1, 2] }
    [[mix]]                           # the workload mix: one entry drawn per machine, by weight
    workload = "desktop.toml"
    weight = 3
    [mix.draw]                        # drawn for the machines that got this entry
    "phase.browsing.times" = { dist = "int", min = 2, max = 16 }   # uptime: rounds of use

A draw is a constant, or a table with ``dist``: ``choice`` (``values``, optional ``weights``),
``int`` (``min``, ``max``, both included), ``uniform`` (``min``, ``max``), ``lognormal``
(``median``, ``sigma``, optional ``min``, ``max``, ``int = true`` to round). Keys are the same
dotted paths as a sweep's grid. Machine ``m`` draws from ``numpy.random.default_rng([seed, m])``,
so adding machines does not change the ones drawn before; its workload seed is drawn too.
Each machine is played once per design (the same machine, the same seed: paired).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.sweep import (
    ParamError,
    Params,
    RunTask,
    SpecError,
    SpecFile,
    load_workload_data,
    param_error,
    run_key,
    text_hash,
    with_params,
)
from tools.workload import WorkloadError, workload_from_data

DISTS = ("choice", "int", "uniform", "lognormal")


@dataclass(frozen=True, slots=True, kw_only=True)
class Draw:
    """One drawn parameter: a dotted path and how to draw its value."""

    path: str
    dist: str  # "const" or one of DISTS
    values: tuple[Any, ...] = ()
    weights: tuple[float, ...] = ()
    lo: float = 0.0
    hi: float = 0.0
    median: float = 1.0
    sigma: float = 1.0
    as_int: bool = False

    def sample(self, rng: np.random.Generator) -> Any:
        match self.dist:
            case "const":
                return self.values[0]
            case "choice":
                p = np.asarray(self.weights, dtype=np.float64)
                return self.values[int(rng.choice(len(self.values), p=p / p.sum()))]
            case "int":
                return int(rng.integers(int(self.lo), int(self.hi), endpoint=True))
            case "uniform":
                return float(rng.uniform(self.lo, self.hi))
            case _:
                x = float(
                    np.clip(rng.lognormal(math.log(self.median), self.sigma), self.lo, self.hi)
                )
                return round(x) if self.as_int else x

    def extremes(self) -> tuple[Any, ...]:
        """Values to check the path and the range with, before drawing any machine."""
        match self.dist:
            case "const" | "choice":
                return self.values
            case "int":
                return (int(self.lo), int(self.hi))
            case "uniform":
                return (float(self.lo), float(self.hi))
            case _:
                return (round(self.lo), round(self.hi)) if self.as_int else (self.lo, self.hi)


@dataclass(frozen=True, slots=True, kw_only=True)
class Mix:
    name: str  # the workload file as written in the spec
    workload: str  # the file found
    text: str
    data: dict[str, Any]
    weight: float
    draws: tuple[Draw, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Machine:
    index: int
    mix: int
    seed: int
    params: Params


@dataclass(frozen=True, slots=True, kw_only=True)
class Fleet:
    file: str
    name: str
    description: str
    designs: tuple[str, ...]
    machines: tuple[Machine, ...]
    mixes: tuple[Mix, ...]
    tasks: tuple[RunTask, ...]


def _num(spec: SpecFile, t: Mapping[str, Any], where: tuple[str | int, ...], key: str) -> float:
    v = t.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise spec.error((*where, key), f"{key} must be a number, not {v!r}")
    return float(v)


def _draw(spec: SpecFile, path: str, raw: object, where: tuple[str | int, ...]) -> Draw:
    if path == "seed":
        raise spec.error(where, "a machine's seed is drawn already (from the spec's seed)")
    if not isinstance(raw, dict):
        return Draw(path=path, dist="const", values=(raw,))
    dist = raw.get("dist")
    if dist not in DISTS:
        raise spec.error(
            (*where, "dist"), f"{path}: dist must be one of {' | '.join(DISTS)}, not {dist!r}"
        )
    keys = {
        "choice": ("dist", "values", "weights"),
        "int": ("dist", "min", "max"),
        "uniform": ("dist", "min", "max"),
        "lognormal": ("dist", "median", "sigma", "min", "max", "int"),
    }[dist]
    spec.allow(raw, where, keys)
    if dist == "choice":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise spec.error((*where, "values"), f"{path}: values must be a non-empty array")
        weights = raw.get("weights", [1.0] * len(values))
        if (
            not isinstance(weights, list)
            or len(weights) != len(values)
            or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights
            )
            or sum(weights) <= 0
        ):
            raise spec.error(
                (*where, "weights"),
                f"{path}: weights must be {len(values)} non-negative numbers with a positive sum",
            )
        return Draw(
            path=path, dist=dist, values=tuple(values), weights=tuple(float(w) for w in weights)
        )
    if dist in ("int", "uniform"):
        lo, hi = _num(spec, raw, where, "min"), _num(spec, raw, where, "max")
        if hi < lo or (dist == "int" and (lo != int(lo) or hi != int(hi))):
            raise spec.error(
                where,
                f"{path}: min and max must be {'integers ' if dist == 'int' else ''}"
                "with min <= max",
            )
        return Draw(path=path, dist=dist, lo=lo, hi=hi)
    median, sigma = _num(spec, raw, where, "median"), _num(spec, raw, where, "sigma")
    lo = _num(spec, raw, where, "min") if "min" in raw else 0.0
    hi = _num(spec, raw, where, "max") if "max" in raw else median * 1000
    as_int = raw.get("int", False)
    if median <= 0 or sigma < 0 or hi < lo or not isinstance(as_int, bool):
        raise spec.error(
            where, f"{path}: needs median > 0, sigma >= 0, min <= max, int true or false"
        )
    return Draw(path=path, dist=dist, median=median, sigma=sigma, lo=lo, hi=hi, as_int=as_int)


def _draws(spec: SpecFile, raw: object, where: tuple[str | int, ...]) -> tuple[Draw, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise spec.error(where, "draw must be a table of dotted paths")
    return tuple(_draw(spec, p, v, (*where, p)) for p, v in raw.items())


def _check(spec: SpecFile, mix: Mix, draws: tuple[Draw, ...], where: tuple[str | int, ...]) -> None:
    """Each draw's extreme values alone on the mix's workload: an error names the draw's line."""
    for d in draws:
        for v in d.extremes():
            try:
                workload_from_data(with_params(mix.data, ((d.path, v),)), mix.workload, mix.text)
            except (ParamError, WorkloadError) as e:
                raise param_error(spec, (*where, d.path), d.path, v, e, mix.workload) from None


def load_fleet(path: str | Path, first: int | None = None) -> Fleet:
    """Read a fleet spec, draw its machines and build their runs (:class:`SpecError` if wrong);
    ``first``: only the first machines (the same draws as in the whole fleet)."""
    spec = SpecFile(path)
    d = spec.data
    spec.allow(d, (), ("name", "description", "machines", "seed", "designs", "draw", "mix"))
    n = d.get("machines")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
        raise spec.error(
            ("machines",), f"machines must be a count between 1 and 1000000, not {n!r}"
        )
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise spec.error(("seed",), f"seed must be a non-negative integer, not {seed!r}")
    designs = tuple(x.value for x in spec.designs())
    common = _draws(spec, d.get("draw"), ("draw",))
    raw_mix = d.get("mix")
    if not isinstance(raw_mix, list) or not raw_mix:
        raise spec.error(("mix",), "mix must be one or more [[mix]] tables (workload, weight)")
    mixes: list[Mix] = []
    for i, m in enumerate(raw_mix):
        where: tuple[str | int, ...] = ("mix", i)
        if not isinstance(m, dict):
            raise spec.error(where, "each [[mix]] must be a table")
        spec.allow(m, where, ("workload", "weight", "draw"))
        if "workload" not in m:
            raise spec.error(where, "missing required key 'workload'")
        name, text, data = load_workload_data(spec, (*where, "workload"), m["workload"])
        weight = m.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise spec.error(
                (*where, "weight"), f"weight must be a positive number, not {weight!r}"
            )
        mix = Mix(
            name=str(m["workload"]),
            workload=name,
            text=text,
            data=data,
            weight=float(weight),
            draws=_draws(spec, m.get("draw"), (*where, "draw")),
        )
        _check(spec, mix, common, ("draw",))
        _check(spec, mix, mix.draws, (*where, "draw"))
        mixes.append(mix)
    if first is not None:
        n = min(n, first)
    p = np.array([m.weight for m in mixes])
    machines: list[Machine] = []
    tasks: list[RunTask] = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        mi = int(rng.choice(len(mixes), p=p / p.sum()))
        mix = mixes[mi]
        params: Params = tuple((dr.path, dr.sample(rng)) for dr in (*common, *mix.draws))
        wseed = int(rng.integers(0, 2**31))
        try:
            w = workload_from_data(with_params(mix.data, params), mix.workload, mix.text)
        except (ParamError, WorkloadError) as e:
            drawn = ", ".join(f"{q} = {v!r}" for q, v in params)
            raise spec.error(("mix", mi), f"machine {k} ({drawn}): {e}") from None
        w = dataclasses.replace(w, seed=wseed)
        machines.append(Machine(index=k, mix=mi, seed=wseed, params=params))
        # The key: the workload's text, not how its path is spelled (resume from anywhere).
        key_labels: Params = (("machine", k),)
        labels: Params = (("machine", k), ("mix", mix.name))
        for design in designs:
            tasks.append(
                RunTask(
                    key=run_key(text_hash(mix.text), params, design, wseed, key_labels),
                    design=design,
                    seed=wseed,
                    params=params,
                    labels=labels,
                    workload=w,
                )
            )
    return Fleet(
        file=spec.file,
        name=str(d.get("name", spec.path.stem)),
        description=str(d.get("description", "")),
        designs=designs,
        machines=tuple(machines),
        mixes=tuple(mixes),
        tasks=tuple(tasks),
    )


__all__ = ["DISTS", "Draw", "Fleet", "Machine", "Mix", "SpecError", "load_fleet"]
