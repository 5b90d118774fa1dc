# Sweep: one job per grid point; its target is the point's hash folder <store>/<hash>/run.json.
# The hashes are computed here, while the DAG is built (pipeline.sweep.expand -> compose_spec +
# config_hash), so a point that is already stored is not run again, whoever stored it.
import pipeline.sweep as _sweep

try:
    POINTS = _sweep.expand(config, base_dir=".") if config.get("grid") else []
except _sweep.SweepError as _e:
    raise workflow_error(str(_e)) from None
POINT_BY_HASH = {p.hash: p for p in POINTS}
SWEEP_NAME = config.get("name", "sweep")
SWEEP_DIR = f"{STORE}/sweeps/{SWEEP_NAME}"
SWEEP_TARGETS = [f"{SWEEP_DIR}/summary.csv", f"{SWEEP_DIR}/contact_sheet.png"] if POINTS else []


wildcard_constraints:
    hash="[0-9a-f]{16}",


rule run_point:
    """One nbsim run: `python -m nbsim <overrides> store.root=<store>` (the Hydra app itself)."""
    output:
        f"{STORE}/{{hash}}/run.json",
    log:
        f"{LOGS}/run_point/{{hash}}.log",
    params:
        overrides=lambda w: POINT_BY_HASH[w.hash].shell_overrides(),
        store=lambda w, output: shlex.quote(str(Path(output[0]).parent.parent)),
    threads: config.get("threads", 1)
    resources:
        mem_mb=config.get("mem_mb", 2000),
        runtime=config.get("runtime", 30),
    shell:
        "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
        "{PY} -m nbsim {params.overrides} store.root={params.store} > {log} 2>&1 && "
        "test -f {output} || {{ echo 'nbsim did not store {output}: see {log}' >&2; exit 1; }}"


rule sweep_summary:
    """summary.csv (overrides, hash, statistics, wall time) and contact_sheet.png of the sweep."""
    input:
        [f"{STORE}/{p.hash}/run.json" for p in POINTS],
    output:
        csv=f"{SWEEP_DIR}/summary.csv",
        sheet=f"{SWEEP_DIR}/contact_sheet.png",
    log:
        f"{LOGS}/sweep_summary/{SWEEP_NAME}.log",
    params:
        points=[" ".join(p.overrides) for p in POINTS],    # a changed grid reruns the summary
    threads: 1
    localrule: True
    run:
        rows = _sweep.write_summary(POINTS, STORE, output.csv, output.sheet, name=SWEEP_NAME,
                                    thumb=config.get("thumb", 200))
        Path(log[0]).write_text(f"{len(rows)} points -> {output.csv}, {output.sheet}\n")
