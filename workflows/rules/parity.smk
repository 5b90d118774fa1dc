# Parity: every case of the cases file through nbsim and the C program ($NB_C_BIN, or golden data),
# one job per case, then report.md, then a check that fails when a case did not pass.
#
#   snakemake -s workflows/Snakefile --configfile workflows/config/parity.yaml --cores 2
#   snakemake -s workflows/Snakefile --cores 2 parity --config 'parity={golden: tests/golden}'
import json as _json
import os as _os

import pipeline.c_runner as _c_runner
import pipeline.parity as _parity

PARITY = {"cases": str(REPO / "workflows/config/parity_cases.yaml"), "golden": None, "out": f"{STORE}/parity",
          "c_cache": f"{STORE}/c_cache", "device": "cpu", "dtype": "float64", "threads": 1,
          **(config.get("parity") or {})}
try:
    PARITY_CASES = {c.id: c for c in _parity.load_cases(PARITY["cases"]).cases}
except _parity.ParityConfigError as _e:
    raise workflow_error(str(_e)) from None
PARITY_OUT = PARITY["out"]
PARITY_TARGETS = [f"{PARITY_OUT}/report.md", f"{PARITY_OUT}/PASSED"]
# nbsim's code is an input of every case: editing it reruns the cases (the C side stays cached)
NBSIM_CODE = sorted(str(p) for p in (REPO / "nbsim").rglob("*.py")) + \
    [str(REPO / f"pipeline/{m}.py") for m in ("parity", "compare", "c_runner")]


rule parity_case:
    input:
        lambda w: parity_reference_or_stop(PARITY, NBSIM_CODE),
    output:
        f"{PARITY_OUT}/{{case}}/result.json",
    log:
        f"{LOGS}/parity_case/{{case}}.log",
    params:
        case=lambda w: _json.dumps(vars(PARITY_CASES[w.case]), sort_keys=True),
        golden=lambda w: f"--golden {shlex.quote(PARITY['golden'])}" if PARITY.get("golden") else "",
        cases=shlex.quote(PARITY["cases"]),
        c_cache=shlex.quote(PARITY["c_cache"]),
        device=shlex.quote(PARITY["device"]),
        dtype=shlex.quote(PARITY["dtype"]),
    threads: PARITY["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "OMP_NUM_THREADS={threads} {PY} -m pipeline.parity --cases {params.cases} --only {wildcards.case} "
        "--out {PARITY_OUT} --c-cache {params.c_cache} --device {params.device} --dtype {params.dtype} "
        "{params.golden} --no-report --no-fail > {log} 2>&1"


rule parity_report:
    input:
        [f"{PARITY_OUT}/{c}/result.json" for c in PARITY_CASES],
    output:
        f"{PARITY_OUT}/report.md",
    log:
        f"{LOGS}/parity_report.log",
    params:
        ids=",".join(PARITY_CASES),
    localrule: True
    shell:
        "{PY} -m pipeline.report parity {PARITY_OUT} --ids {params.ids} --report {output} > {log} 2>&1"


rule parity_check:
    """Fails (keeping the report) when a case did not pass."""
    input:
        report=f"{PARITY_OUT}/report.md",
        results=[f"{PARITY_OUT}/{c}/result.json" for c in PARITY_CASES],
    output:
        f"{PARITY_OUT}/PASSED",
    log:
        f"{LOGS}/parity_check.log",
    params:
        ids=",".join(PARITY_CASES),
    localrule: True
    shell:
        "{PY} -m pipeline.report check {PARITY_OUT} --ids {params.ids} > {log} 2>&1 "
        "&& cp {log} {output} || {{ cat {log} >&2; exit 1; }}"


rule parity:
    """Target: the parity report and its check."""
    input:
        PARITY_TARGETS,
    localrule: True
