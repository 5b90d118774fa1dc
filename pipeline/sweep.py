"""Parameter sweeps: a grid of Hydra overrides -> points -> ``<store_root>/<config hash>/``.

A sweep config (``workflows/config/sweep.yaml``, schema ``workflows/schemas/sweep.schema.yaml``)::

    name: demo                       # summary goes to <store_root>/sweeps/<name>/
    store_root: outputs
    base: [detector.fpixels=128, detector.spixels=128]    # applied to every point
    grid:                            # the cartesian product of these values
      detector.distance_mm: [80, 100]
      crystal.N: [3, 5]
      detector: [mosflm, xds]        # config-group choices work too (detector=xds)

Every point is stored exactly as ``python -m nbsim <overrides> store.root=<store_root>`` stores it.
Its folder name, the config hash, is computed here when the Snakemake DAG is built (``Composer`` +
``config_hash``, the same composition and hash as the app), so a rerun with nothing changed does
nothing, one more grid value computes only its own point, and a point already computed by
``python -m nbsim --multirun ...`` (same hash) is not computed again.

Points are computed in **batches** (``batch_size``: auto or a number; ``plan_batches``): one job,
one process (``python -m pipeline.sweep run-batch <manifest>``, i.e. ``run_points``) renders many
points through ``pipeline.store.run_many`` / ``nbsim.batch`` and stores each in its own folder as
soon as it is done; the batch's marker ``<store_root>/.sweep_batches/<id>.done`` lists its points.

usage:
  python -m pipeline.sweep run-batch MANIFEST [--done MARKER]   # one batch job (Snakemake)
  python -m pipeline.sweep summary-of POINTS --store R --csv C --sheet S   # the summary job (Snakemake)
  python -m pipeline.sweep points CONFIG         # the points, their hashes and whether they are stored
  python -m pipeline.sweep multirun CONFIG       # the equivalent `python -m nbsim --multirun` command
  python -m pipeline.sweep summary CONFIG        # summary.csv + contact_sheet.png of stored points
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflows" / "schemas" / "sweep.schema.yaml"
DEFAULTS = {"name": "sweep", "store_root": "outputs", "base": [], "threads": 1}
STAT_COLUMNS = ("max_I", "mean", "rms", "rmsd", "sum")


class SweepError(ValueError):
    """A sweep config problem (one line naming the key / point)."""


# ---------------------------------------------------------------------------------------------
# override formatting
# ---------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_.:/+\-@]+$")


def format_value(v) -> str:
    """A YAML value as Hydra override syntax (``80``, ``true``, ``null``, ``[1,2,3]``, ``'a b'``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise SweepError(f"non-finite value {v!r} in the grid")
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in ("null", "true", "false"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override(key: str, v) -> str:
    return f"{key}={format_value(v)}"


def short_key(key: str) -> str:
    """``detector.distance_mm`` -> ``distance_mm`` (labels); group names stay as they are."""
    return key.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def schema_problem(config: dict, schema: Union[str, Path] = SCHEMA) -> Optional[str]:
    """One line naming the key of the most relevant schema violation, or None if valid."""
    import jsonschema
    import yaml
    sch = yaml.safe_load(Path(schema).read_text())
    cls = jsonschema.validators.validator_for(sch)
    err = jsonschema.exceptions.best_match(cls(sch).iter_errors(dict(config)))
    if err is None:
        return None
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    desc = err.schema.get("description") if isinstance(err.schema, dict) and err.absolute_path else None
    return f"sweep config: {where}: {err.message}" + (f" ({where}: {desc.strip()})" if desc else "")


def validate_config(config: dict, schema: Union[str, Path] = SCHEMA) -> dict:
    """Validate (and fill defaults of) a sweep config with the JSON schema; SweepError on failure."""
    cfg = {**DEFAULTS, **dict(config)}
    msg = schema_problem(cfg, schema)
    if msg:
        raise SweepError(msg)
    return cfg


def load_config(path: Union[str, Path]) -> dict:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep config {p}: no such file")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise SweepError(f"sweep config {p}: must be a mapping")
    return validate_config(data)


# ---------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------

@dataclass
class Point:
    index: int
    params: Dict[str, object]          # grid key -> value of this point
    overrides: List[str]               # base + grid, Hydra syntax
    hash: str = ""
    label: str = ""
    #: the point's composed configuration, ``{"spec", "device", "store"}`` as plain dicts (``expand``):
    #: a batch job rebuilds the spec from it without composing again (``run_points``)
    resolved: Optional[dict] = field(default=None, compare=False, repr=False)

    def folder(self, root: Union[str, Path]) -> Path:
        return Path(root) / self.hash

    def canonical_overrides(self) -> List[str]:
        """The overrides with one entry per key (the last wins, as in Hydra), sorted by key: the
        same point spelled in another order gives the same command (Snakemake's params trigger)."""
        last = {}
        for o in self.overrides:
            last[o.split("=", 1)[0]] = o
        return [last[k] for k in sorted(last)]

    def shell_overrides(self) -> str:
        return shlex.join(self.canonical_overrides())


def grid_points(config: dict) -> List[Tuple[Dict[str, object], List[str]]]:
    """Cartesian product of the grid (keys in config order, last key fastest)."""
    grid = config.get("grid") or {}
    base = list(config.get("base") or [])
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        out.append((params, base + [override(k, v) for k, v in params.items()]))
    return out


class Composer:
    """``compose_config(overrides)`` for many override lists at a fraction of the cost (~8 ms instead
    of ~60 ms a point): Hydra composes the config once per distinct set of *structural* overrides
    (config groups such as ``detector=xds``, ``+``/``~``/``++`` forms, ``hydra.*``); the plain
    ``key=value`` overrides are then applied to a copy as Hydra applies them after composing
    (``OmegaConf.update(cfg, key, parsed value, merge=True)``, the same parser). Anything the fast
    path does not handle, and every error, goes through the full composition, so errors read the same."""

    def __init__(self):
        from hydra.core.override_parser.overrides_parser import OverridesParser
        self._parser = OverridesParser.create()
        self._bases: dict = {}
        self._applied: dict = {}                        # structural -> {key: (override, base value)}
        self._parsed: dict = {}                         # override text -> parsed Override

    def _parse(self, overrides: List[str]) -> list:
        out = []
        for line in overrides:
            o = self._parsed.get(line)
            if o is None:
                o = self._parsed[line] = self._parser.parse_overrides([line])[0]
            out.append(o)
        return out

    @staticmethod
    def _structural(o) -> bool:
        from pipeline.compose import CONF_DIR
        key = o.key_or_group
        return (o.is_delete() or o.is_add() or o.is_force_add() or o.package is not None
                or o.is_sweep_override() or key.startswith("hydra") or "/" in key
                or (CONF_DIR / key).is_dir())

    def _base(self, parsed):
        """(plain overrides, structural key, the cached base composed from the structural ones,
        its applied-key record ``{key: (override text, the base's own value)}``)."""
        from pipeline.compose import compose_config
        structural = tuple(o.input_line for o in parsed if self._structural(o))
        plain = [o for o in parsed if not self._structural(o)]
        if structural not in self._bases:
            self._bases[structural] = compose_config(list(structural))
            self._applied[structural] = {}
        return plain, structural, self._bases[structural], self._applied[structural]

    def _put_back(self, structural, keys) -> None:
        """Set ``keys`` of the base back to its own values (the last set first: a key inside
        another) and forget them."""
        from omegaconf import OmegaConf
        base, applied = self._bases[structural], self._applied[structural]
        for key in reversed(list(keys)):
            OmegaConf.update(base, key, applied.pop(key)[1], merge=False)

    def _drop(self, structural) -> None:
        """Forget a base (composed again on next use)."""
        self._bases.pop(structural, None)
        self._applied.pop(structural, None)

    def config(self, overrides: Sequence[str]):
        """The composed app config (DictConfig) of ``overrides``."""
        import copy

        from omegaconf import OmegaConf

        from pipeline.compose import compose_config
        overrides = list(overrides)
        try:
            parsed = self._parse(overrides)
        except Exception:                               # noqa: BLE001 - the full path reports it
            return compose_config(overrides)
        plain, structural, base, applied = self._base(parsed)
        try:                                            # the base as composed (resolve leaves values)
            self._put_back(structural, applied)
        except Exception:                               # noqa: BLE001 - composed again
            self._drop(structural)
            return compose_config(overrides)
        cfg = copy.deepcopy(base)
        try:
            for o in plain:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except Exception:                               # noqa: BLE001 - the full path reports it
            return compose_config(overrides)
        return cfg

    def spec(self, overrides: Sequence[str]):
        """``(ExperimentSpec, DeviceSpec)`` of ``overrides`` (= ``compose_spec(overrides)``)."""
        return self.resolve(overrides)[:2]

    _MISSING = object()

    @staticmethod
    def _leaf_keys(plain) -> Optional[Dict[str, object]]:
        """``{key: override}`` when the plain overrides can be applied incrementally: distinct keys,
        none inside another, no mapping values (those merge into what is there); else None."""
        want = {}
        for o in plain:
            key = o.key_or_group
            if key in want or isinstance(o.value(), dict):
                return None
            want[key] = o
        return want

    @staticmethod
    def _nested(keys) -> bool:
        """Whether one of ``keys`` lies inside another (``a`` and ``a.b``)."""
        ks = sorted(keys)
        return any(b.startswith(a + ".") for a, b in zip(ks, ks[1:]))

    def resolve(self, overrides: Sequence[str]):
        """``(ExperimentSpec, DeviceSpec, store section as a dict, quiet)`` of ``overrides``, without
        copying the composed config: the plain overrides are applied to the cached base and read.
        Points of a grid set the same keys: the base keeps the previous point's values, only the
        keys whose value changed are set again, and keys the previous point set that this one does
        not are put back to the base's own value (exactly the config a fresh application gives: every
        key is a distinct leaf or list, replaced whole). Anything else (a key set twice, a key
        inside another, a mapping value) puts every key back first and applies the overrides in
        order. Any failure drops the base (it is composed again) and takes the full path, which
        reports the error."""
        from omegaconf import DictConfig, ListConfig, OmegaConf

        from pipeline.compose import cfg_to_spec, compose_config
        overrides = list(overrides)

        def full():
            cfg = compose_config(overrides)
            return (*cfg_to_spec(cfg), OmegaConf.to_container(cfg.store), bool(cfg.get("quiet", False)))
        try:
            parsed = self._parse(overrides)
        except Exception:                               # noqa: BLE001 - the full path reports it
            return full()
        plain, structural, base, applied = self._base(parsed)

        def original(key):
            old = OmegaConf.select(base, key, default=self._MISSING)
            if old is self._MISSING:
                raise KeyError(key)
            return OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old

        def put_back(keys):
            self._put_back(structural, keys)
        try:
            want = self._leaf_keys(plain)
            if want is None or self._nested(set(want) | set(applied)):
                put_back(applied)
                want = None
            else:
                put_back([k for k in applied if k not in want])
            for o in (plain if want is None else want.values()):
                key = o.key_or_group
                if want is not None and applied.get(key, (None,))[0] == o.input_line:
                    continue                            # already set to this value
                if key not in applied:
                    applied[key] = (o.input_line, original(key))
                else:
                    applied[key] = (o.input_line, applied[key][1])
                OmegaConf.update(base, key, o.value(), merge=True)
            out = (*cfg_to_spec(base), OmegaConf.to_container(base.store), bool(base.get("quiet", False)))
            if want is None:
                put_back(applied)
        except Exception:                               # noqa: BLE001 - the full path reports it
            self._drop(structural)
            return full()
        return out


def spec_hash(spec, device, base_dir: Union[str, Path] = ".") -> str:
    """The config hash the store files ``spec`` under: ``config_hash`` of the spec with its ROI
    resolved (``nbsim.checks.normalize_roi``, as the store's preflight does before hashing)."""
    from nbsim.checks import normalize_roi
    from pipeline.hashing import config_hash
    normalize_roi(spec)
    return config_hash(spec, device, base_dir)


def point_hash(overrides: Sequence[str], base_dir: Union[str, Path] = ".",
               composer: Optional[Composer] = None) -> str:
    """The config hash ``python -m nbsim <overrides>`` stores its result under."""
    spec, device = (composer or Composer()).spec(list(overrides))
    return spec_hash(spec, device, base_dir)


def expand(config: dict, base_dir: Union[str, Path] = ".") -> List[Point]:
    """All points of a (validated) sweep config, with their hashes. Duplicate hashes are merged
    (two spellings of the same experiment are one job)."""
    from pipeline.compose import format_error
    from nbsim.spec import spec_to_dict
    points, seen = [], {}
    composer = Composer()
    for i, (params, ovr) in enumerate(grid_points(config)):
        label = " ".join(f"{short_key(k)}={format_value(v)}" for k, v in params.items())
        try:
            spec, device, store, _ = composer.resolve(list(ovr))
            h = spec_hash(spec, device, base_dir)
            resolved = {"spec": spec_to_dict(spec), "device": spec_to_dict(device), "store": store}
        except Exception as exc:                    # noqa: BLE001 - config errors become one line
            msg = format_error(exc)
            if msg is None:
                raise
            raise SweepError(f"sweep point {i} ({label or 'base only'}): {msg}") from None
        if h in seen:
            continue
        seen[h] = True
        points.append(Point(index=len(points), params=params, overrides=ovr, hash=h, label=label,
                            resolved=resolved))
    return points


def multirun_command(config: dict) -> List[str]:
    """The ``python -m nbsim --multirun`` argv that computes the same hash folders."""
    args = ["python", "-m", "nbsim", "--multirun"] + list(config.get("base") or [])
    for k, vals in (config.get("grid") or {}).items():
        args.append(f"{k}=" + ",".join(format_value(v) for v in vals))
    root = config.get("store_root", "outputs")
    if root != "outputs":
        args.append(f"store.root={root}")
    return args


# ---------------------------------------------------------------------------------------------
# batches: many points per process
# ---------------------------------------------------------------------------------------------

BATCH_SECONDS = 10.0      # batch_size auto on a cluster: about this much estimated work per job
BATCH_DIR = ".sweep_batches"   # under the store root: batch manifests (.json) and markers (.done)


@dataclass
class Batch:
    id: str                    # 16 hex: sha256 of the batch's point hashes
    points: List[Point]

    def manifest(self, root: Union[str, Path]) -> Path:
        return Path(root) / BATCH_DIR / f"{self.id}.json"

    def marker(self, root: Union[str, Path]) -> Path:
        return Path(root) / BATCH_DIR / f"{self.id}.done"


def is_stored(point: Point, root: Union[str, Path]) -> bool:
    """Whether ``<root>/<hash>/run.json`` exists (the entry is complete: it is written last, and the
    folder appears by a rename). Its checksums are verified by the job that would reuse it."""
    return (point.folder(root) / "run.json").is_file()


def batch_markers(root: Union[str, Path]) -> Dict[str, str]:
    """``{point hash: marker}`` of the batches that finished under ``root`` (each ``.done`` file lists
    its points' hashes; the first marker in name order wins). Rules depend on a stored point through
    the marker of the batch that computed it, so the inputs of the summary stay the same set from
    one run to the next (Snakemake reruns a rule whose set of inputs changed)."""
    out: Dict[str, str] = {}
    d = Path(root) / BATCH_DIR
    if not d.is_dir():
        return out
    for m in sorted(d.glob("*.done")):
        try:
            hashes = m.read_text().split()
        except OSError:
            continue
        for h in hashes:
            out.setdefault(h, str(m))
    return out


def point_seconds(point: Point, base_dir: Union[str, Path] = ".",
                  composer: Optional[Composer] = None) -> float:
    """Estimated kernel seconds of one point (``nbsim.checks.estimate``), at least 50 ms (the
    per-point cost outside the kernel)."""
    from nbsim.batch import estimated_seconds
    spec, device = (composer or Composer()).spec(point.overrides)
    return max(0.05, estimated_seconds(spec, device, base_dir))


def plan_batches(points: Sequence[Point], batch_size: Union[int, str] = "auto", *, slots: int = 1,
                 cluster: bool = False, batch_seconds: float = BATCH_SECONDS,
                 base_dir: Union[str, Path] = ".") -> List[Batch]:
    """Split ``points`` (in order) into batches, one process each.

    ``batch_size``: points per batch, or ``auto``: on one machine (``cluster`` false) the points are
    shared out over the ``slots`` jobs that run at once (cores / threads per job), so every slot
    holds one process; on a cluster a batch takes points until their estimated time reaches
    ``batch_seconds`` (a job of about 10 s: the process start is repaid, the jobs stay many)."""
    pts = list(points)
    if not pts:
        return []
    if batch_size == "auto":
        if not cluster:
            size = -(-len(pts) // max(1, int(slots)))
            chunks = [pts[i:i + size] for i in range(0, len(pts), size)]
        else:
            composer = Composer()
            chunks, cur, acc = [], [], 0.0
            for p in pts:
                cur.append(p)
                acc += point_seconds(p, base_dir, composer)
                if acc >= batch_seconds:
                    chunks.append(cur)
                    cur, acc = [], 0.0
            if cur:
                chunks.append(cur)
    else:
        size = int(batch_size)
        if size < 1:
            raise SweepError(f"batch_size: must be an integer >= 1 or auto, got {batch_size!r}")
        chunks = [pts[i:i + size] for i in range(0, len(pts), size)]
    import hashlib
    return [Batch(id=hashlib.sha256(",".join(p.hash for p in c).encode()).hexdigest()[:16], points=c)
            for c in chunks]


def write_manifest(batch: Batch, root: Union[str, Path], thumb: Optional[int] = 200) -> Path:
    """The batch's manifest ``<root>/.sweep_batches/<id>.json`` (its points' overrides, hashes and,
    where ``expand`` composed them, resolved configurations), written atomically; what
    ``python -m pipeline.sweep run-batch`` reads."""
    doc = {"id": batch.id, "store_root": str(root), "thumb": thumb,
           "points": [{"hash": p.hash, "overrides": p.canonical_overrides(), "label": p.label,
                       **({"resolved": p.resolved} if p.resolved is not None else {})}
                      for p in batch.points]}
    return _write_json_if_changed(batch.manifest(root), doc)


def _write_json_if_changed(path: Union[str, Path], doc) -> Path:
    """``doc`` as JSON at ``path``, written atomically and only when the text changed (its time
    stamp then tells Snakemake that something changed)."""
    from nbsim.io.atomic import atomic_write_bytes
    path = Path(path)
    text = json.dumps(doc, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    return path


def run_points(overrides: Sequence[Sequence[str]], root: Optional[Union[str, Path]] = None, *,
               hashes: Optional[Sequence[str]] = None, base_dir: Union[str, Path] = ".",
               thumb: Optional[int] = 200, log=None, composer: Optional[Composer] = None,
               on_done=None, resolved: Optional[Sequence[Optional[dict]]] = None) -> list:
    """Compute (or reuse) the points ``overrides`` in this process, each stored in its own
    ``<root>/<hash>/`` (``root``: else each point's ``store.root``): ``pipeline.store.run_many`` per
    distinct store setting. ``hashes``: the hashes the points must have (a point whose
    configuration now hashes differently, e.g. an input file edited since, is refused).
    ``resolved``: each point's composed configuration (``Point.resolved``, from a manifest): the
    spec is rebuilt from it without Hydra when it hashes to the planned hash, else composed again.
    Returns ``[(folder, reused, run_json)]`` in order."""
    from pipeline.store import run_many, store_options
    log = log or (lambda s: print(s, file=sys.stderr))
    items, stores = [], {}
    for i, ovr in enumerate(overrides):
        got = _from_resolved(resolved[i] if resolved else None,
                             hashes[i] if hashes is not None else None, base_dir)
        if got is None:
            composer = composer or Composer()
            spec, device, st, _ = composer.resolve(ovr)
            h = spec_hash(spec, device, base_dir)
        else:
            spec, device, st, h = got
        if hashes is not None and hashes[i] != h:
            raise SweepError(f"sweep point {' '.join(ovr)}: its configuration now hashes to {h}, the "
                             f"workflow planned {hashes[i]} (an input file changed?); rerun Snakemake")
        stores.setdefault(tuple(store_options(st, root).items()), []).append(i)
        items.append((spec, device, h))
    out: list = [None] * len(items)
    for opts, idx in stores.items():
        got = run_many([items[i][:2] for i in idx], **dict(opts), base_dir=base_dir, log=log, thumb=thumb)
        for i, res in zip(idx, got):
            out[i] = res
    return out


def _from_resolved(resolved: Optional[dict], planned: Optional[str], base_dir):
    """``(spec, device, store section, hash)`` rebuilt from a point's resolved configuration, when it
    hashes to the ``planned`` hash; None otherwise (no configuration, or it differs now: the caller
    composes the overrides again, which names any problem)."""
    if not resolved or planned is None:
        return None
    from nbsim.spec import DeviceSpec, spec_from_dict
    try:
        spec = spec_from_dict(resolved["spec"])
        device = DeviceSpec(**resolved["device"])
        h = spec_hash(spec, device, base_dir)
    except Exception:                                   # noqa: BLE001 - composed again instead
        return None
    return (spec, device, dict(resolved["store"]), h) if h == planned else None


def run_batch_manifest(manifest: Union[str, Path], done: Optional[Union[str, Path]] = None,
                       base_dir: Union[str, Path] = ".") -> int:
    """``python -m pipeline.sweep run-batch MANIFEST [--done MARKER]``: the points of one batch, in
    this process; the marker (the batch's hashes) is written, atomically, once all are stored."""
    from nbsim.io.atomic import atomic_write_bytes
    doc = json.loads(Path(manifest).read_text())
    pts = doc["points"]
    t0 = __import__("time").perf_counter()
    res = run_points([p["overrides"] for p in pts], doc["store_root"], hashes=[p["hash"] for p in pts],
                     base_dir=base_dir, thumb=doc.get("thumb"), resolved=[p.get("resolved") for p in pts])
    wall = __import__("time").perf_counter() - t0
    new = sum(1 for r in res if not r[1])
    kernel = sum(float(r[2].get("wall_time_s") or 0.0) for r in res if not r[1])
    print(f"batch {doc['id']}: {len(res)} points, {new} computed, {len(res) - new} stored already; "
          f"{wall:.2f} s ({kernel:.2f} s simulating)", file=sys.stderr)
    for p, r in zip(pts, res):
        print(f"{r[0]}  {'reused  ' if r[1] else 'computed'}  {p.get('label', '')}", file=sys.stderr)
    if done is not None:
        atomic_write_bytes(Path(done), ("\n".join(p["hash"] for p in pts) + "\n").encode())
    return 0


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------

def summary_rows(points: Sequence[Point], root: Union[str, Path]) -> List[dict]:
    rows = []
    for p in points:
        f = p.folder(root) / "run.json"
        run = json.loads(f.read_text()) if f.is_file() else {}
        stats = run.get("stats", {})
        row = {"point": p.index, **{k: format_value(v) for k, v in p.params.items()},
               "overrides": " ".join(p.overrides), "hash": p.hash, "folder": str(p.folder(root)),
               "stored": bool(run)}
        row.update({k: stats.get(k) for k in STAT_COLUMNS})
        row.update({"wall_time_s": run.get("wall_time_s"), "device": run.get("device"),
                    "dtype": run.get("dtype"), "created_utc": run.get("created_utc")})
        rows.append(row)
    return rows


def write_csv(rows: List[dict], csv_path) -> None:
    """Rows (dicts) as a CSV, columns in order of first appearance, None as empty, written atomically."""
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    os.replace(tmp, csv_path)


def write_summary(points: Sequence[Point], root: Union[str, Path], csv_path: Union[str, Path],
                  sheet_path: Optional[Union[str, Path]] = None, name: str = "sweep",
                  thumb: int = 200) -> List[dict]:
    """Write the CSV table (one row per point) and the contact sheet of the previews."""
    rows = summary_rows(points, root)
    write_csv(rows, csv_path)
    if sheet_path is not None:
        from pipeline.contact_sheet import contact_sheet
        from pipeline.store import entry_thumbnail
        entries = []
        for p, r in zip(points, rows):
            cap = "\n".join(f"{k}={format_value(v)}" for k, v in p.params.items()) or "base"
            mx, wt = r.get("max_I"), r.get("wall_time_s")
            cap += f"\n{p.hash}"
            if mx is not None:
                cap += f"\nmax {mx:.4g}" + (f", {wt:.2f} s" if wt is not None else "")
            entries.append((entry_thumbnail(p.folder(root)), cap))
        contact_sheet(entries, sheet_path, thumb=thumb, title=f"sweep {name}: {len(points)} points")
    return rows


def write_points_file(points: Sequence[Point], path: Union[str, Path]) -> Path:
    """The points of a sweep (index, grid values, overrides, hash) as JSON at ``path``, written
    atomically and only when they changed (its time stamp then tells Snakemake the grid changed):
    what ``python -m pipeline.sweep summary-of`` reads, so that the summary job need not compose
    and hash the grid again (Snakemake runs a ``run:`` rule in a new Snakemake process, which parses
    the whole workflow: ~2 s of the light benchmark grid's 64 points, measured)."""
    doc = [{"index": p.index, "params": p.params, "overrides": list(p.overrides), "hash": p.hash,
            "label": p.label} for p in points]
    return _write_json_if_changed(path, doc)


def read_points_file(path: Union[str, Path]) -> List[Point]:
    """The points ``write_points_file`` wrote."""
    return [Point(index=int(d["index"]), params=dict(d["params"]), overrides=list(d["overrides"]),
                  hash=str(d["hash"]), label=str(d.get("label", "")))
            for d in json.loads(Path(path).read_text())]


def summary_of(points_file: Union[str, Path], root: Union[str, Path], csv_path: Union[str, Path],
               sheet_path: Union[str, Path], name: str = "sweep", thumb: int = 200,
               logs: str = "") -> int:
    """``python -m pipeline.sweep summary-of POINTS``: the summary job of the workflow (no Hydra, no
    torch): ``write_summary`` of the points in ``points_file``; exit 1 naming the points that were
    not stored (the CSV and sheet are written all the same)."""
    points = read_points_file(points_file)
    rows = write_summary(points, root, csv_path, sheet_path, name=name, thumb=thumb)
    missing = [r["hash"] for r in rows if not r["stored"]]
    if missing:
        print(f"sweep {name}: {len(missing)} points were not stored ({', '.join(missing[:3])}...)"
              + (f": see {logs}" if logs else ""), file=sys.stderr)
        return 1
    print(f"{len(rows)} points -> {csv_path}, {sheet_path}")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.sweep",
                                 description="nbsim parameter sweeps (see workflows/Snakefile)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rb = sub.add_parser("run-batch", help="compute the points of one batch manifest in this process "
                        "(the Snakemake batch job)")
    rb.add_argument("manifest", help="<store_root>/.sweep_batches/<id>.json")
    rb.add_argument("--done", help="marker file written once every point is stored")
    so = sub.add_parser("summary-of", help="summary.csv and contact_sheet.png of a points file "
                        "(the Snakemake summary job)")
    so.add_argument("points", help="<store_root>/sweeps/<name>/points.json")
    so.add_argument("--store", required=True, help="the store root")
    so.add_argument("--csv", required=True)
    so.add_argument("--sheet", required=True)
    so.add_argument("--name", default="sweep")
    so.add_argument("--thumb", type=int, default=200)
    so.add_argument("--logs", default="", help="where the batch logs are (named when points are missing)")
    for name, hlp in (("points", "list the points and their hash folders"),
                      ("multirun", "print the equivalent `python -m nbsim --multirun` command"),
                      ("summary", "write summary.csv and contact_sheet.png of the stored points")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("config", help="sweep config YAML")
        if name == "summary":
            p.add_argument("--csv", help="default <store_root>/sweeps/<name>/summary.csv")
            p.add_argument("--sheet", help="default <store_root>/sweeps/<name>/contact_sheet.png")
    a = ap.parse_args(argv)
    if a.cmd == "run-batch":
        return _run_batch_cli(a)
    if a.cmd == "summary-of":
        try:
            return summary_of(a.points, a.store, a.csv, a.sheet, name=a.name, thumb=a.thumb, logs=a.logs)
        except (OSError, ValueError, KeyError) as e:
            print(f"sweep: error: {a.points}: {e}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(a.config)
        if a.cmd == "multirun":
            print(shlex.join(multirun_command(cfg)))
            return 0
        points = expand(cfg)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    root = cfg["store_root"]
    if a.cmd == "points":
        for p in points:
            state = "stored " if (p.folder(root) / "run.json").is_file() else "missing"
            print(f"{p.index:3d}  {p.folder(root)}  {state}  {p.label}")
        return 0
    sweep_dir = Path(root) / "sweeps" / cfg["name"]
    rows = write_summary(points, root, a.csv or sweep_dir / "summary.csv",
                         a.sheet or sweep_dir / "contact_sheet.png", name=cfg["name"])
    missing = [r["hash"] for r in rows if not r["stored"]]
    print(f"summary of {len(rows)} points written to {a.csv or sweep_dir / 'summary.csv'}"
          + (f"; {len(missing)} not computed yet" if missing else ""))
    return 0


def _run_batch_cli(a) -> int:
    """run-batch with the app's error handling: configuration errors in one line (exit 2), SIGTERM
    (kill, SLURM time limit) unwinds so a half-built entry is removed."""
    def format_error(e):                                 # Hydra's imports only when something failed
        from pipeline.compose import format_error as fmt
        return fmt(e)
    from pipeline.proc import exit_on_sigterm, preload_render
    exit_on_sigterm()
    try:
        preload_render()                                 # a batch job always renders (or reuses)
        return run_batch_manifest(a.manifest, a.done)
    except KeyboardInterrupt:
        print("sweep: interrupted; the points stored so far are complete", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError) as e:
        msg = format_error(e) or (f"{a.manifest}: {e}" if not isinstance(e, SweepError) else str(e))
        print(f"sweep: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:                               # noqa: BLE001
        msg = format_error(e)
        if msg is None:
            raise
        print(f"sweep: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from pipeline.proc import exit_now, prepare_process
    prepare_process()                                    # before torch is imported (pipeline.proc)
    _rc = _main()
    if _rc == 0:
        exit_now(0, exit_handlers=True)                  # skip the interpreter's teardown
    sys.exit(_rc)
