# Sweep: the grid points are computed in batches, many points per job (one process, one SLURM job).
# The hashes are computed here, while the DAG is built (pipeline.sweep.expand -> compose + config_hash,
# the same functions the app uses). Points already stored (<store>/<hash>/run.json exists, whoever
# stored it) are left out; the others are split into batches (config `batch_size`, default auto: on
# one machine one batch per job slot, on a cluster about `batch_seconds` of work per job). A batch
# job writes every point to its own <store>/<hash>/ as soon as it is done, then its marker
# <store>/.sweep_batches/<id>.done; a batch killed half-way leaves complete entries only, and the
# next run plans batches of the points still missing.
import pipeline.sweep as _sweep

try:
    POINTS = _sweep.expand(config, base_dir=".") if config.get("grid") else []
except _sweep.SweepError as _e:
    raise workflow_error(str(_e)) from None
POINT_BY_HASH = {p.hash: p for p in POINTS}
SWEEP_NAME = config.get("name", "sweep")
SWEEP_DIR = f"{STORE}/sweeps/{SWEEP_NAME}"
SWEEP_TARGETS = [f"{SWEEP_DIR}/summary.csv", f"{SWEEP_DIR}/contact_sheet.png"] if POINTS else []
SWEEP_POINTS = f"{SWEEP_DIR}/points.json"  # the points (and hashes) the summary job reads
THREADS = config.get("threads", 1)


def _slots():
    """Jobs that run at once on this machine: --cores / threads per job."""
    try:
        cores = int(workflow.cores)
    except Exception:                       # noqa: BLE001 - no --cores (e.g. a dry run)
        cores = 1
    return max(1, cores // max(1, THREADS))


_MISSING = [p for p in POINTS if not _sweep.is_stored(p, STORE)]
try:
    BATCHES = _sweep.plan_batches(_MISSING, config.get("batch_size", "auto"), slots=_slots(),
                                  cluster=not workflow.local_exec,
                                  batch_seconds=config.get("batch_seconds", _sweep.BATCH_SECONDS))
except _sweep.SweepError as _e:
    raise workflow_error(str(_e)) from None
if workflow.is_main_process:                # jobs re-reading this file find the manifests written
    for _b in BATCHES:
        _sweep.write_manifest(_b, STORE, thumb=config.get("thumb", 200))
    if POINTS:
        _sweep.write_points_file(POINTS, SWEEP_POINTS)
BATCH_OF_HASH = {p.hash: b for b in BATCHES for p in b.points}
_DONE = _sweep.batch_markers(STORE)         # stored points: the marker of the batch that stored them


def point_target(h):
    """What a rule needing point ``h`` depends on: the marker of the batch that computes it, or
    that computed it (the same file from run to run), else (stored by another run, e.g. a multirun)
    its run.json."""
    b = BATCH_OF_HASH.get(h)
    if b is not None:
        return str(b.marker(STORE))
    return _DONE.get(h) or f"{STORE}/{h}/run.json"


wildcard_constraints:
    batch="[0-9a-f]{16}",


rule sweep_batch:
    """One batch: `python -m pipeline.sweep run-batch <manifest>` computes its points in one process."""
    input:
        manifest=f"{STORE}/{_sweep.BATCH_DIR}/{{batch}}.json",
    output:
        f"{STORE}/{_sweep.BATCH_DIR}/{{batch}}.done",
    log:
        f"{LOGS}/sweep_batch/{{batch}}.log",
    threads: THREADS
    resources:
        mem_mb=config.get("mem_mb", 2000),
        runtime=config.get("runtime", 30),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
        "{PY} -m pipeline.sweep run-batch {input.manifest:q} --done {output:q} > {log} 2>&1 "
        "|| {{ echo 'nbsim batch failed: see {log}' >&2; exit 1; }}"


rule sweep_summary:
    """summary.csv (overrides, hash, statistics, wall time) and contact_sheet.png of the sweep: a shell
    job reading the points file (a `run:` job would be a new Snakemake process parsing the workflow
    and composing every point again)."""
    input:
        points=SWEEP_POINTS,
        stored=sorted({point_target(p.hash) for p in POINTS}),
    output:
        csv=f"{SWEEP_DIR}/summary.csv",
        sheet=f"{SWEEP_DIR}/contact_sheet.png",
    log:
        f"{LOGS}/sweep_summary/{SWEEP_NAME}.log",
    params:
        points=[" ".join(p.overrides) for p in POINTS],    # a changed grid reruns the summary
        store=STORE,
        name=SWEEP_NAME,
        thumb=config.get("thumb", 200),
        logs=f"{LOGS}/sweep_batch/",
    threads: 1
    localrule: True
    shell:
        "{PY} -m pipeline.sweep summary-of {input.points:q} --store {params.store:q} --csv {output.csv:q} "
        "--sheet {output.sheet:q} --name {params.name:q} --thumb {params.thumb} --logs {params.logs:q} "
        "> {log} 2>&1 || {{ cat {log} >&2; exit 1; }}"
