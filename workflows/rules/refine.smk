# Refinement of many images: one `python -m nbsim.refine` job per image, then a summary CSV of the
# fitted values and sigmas. Config section `refine` (workflows/schemas/sweep.schema.yaml):
#   from_sweep: true   -> the noise image of every sweep point (base needs store.write_noise=true),
#                         each starting from its point's model with `overrides` on top;
#   images: [paths]    -> these observed images, each starting from `overrides`.
# Each job's target is a one-line file naming its result folder (<store>/refine/<hash>/), which
# the app reuses when the same refinement runs again.
import pipeline.refine as _refine

REFINE = config.get("refine") or {}
REFINE_NAME = REFINE.get("name", "refine")
REFINE_DIR = f"{STORE}/refine_runs/{REFINE_NAME}"
REFINE_ITEMS = {}                       # item -> (observed path, input file, overrides)
if REFINE:
    _start = list(REFINE.get("overrides") or [])
    if REFINE.get("from_sweep"):
        for _p in POINTS:
            if "store.write_noise=true" not in _p.overrides:
                raise workflow_error("refine.from_sweep: the sweep's base needs store.write_noise=true "
                                     "(the noise images are what is refined)")
            REFINE_ITEMS[_p.hash] = (f"{STORE}/{_p.hash}/noise.img", point_target(_p.hash),
                                     _refine.merge_overrides(
                                         [o for o in _p.overrides if not o.startswith("store.")], _start))
    for _i, _img in enumerate(REFINE.get("images") or []):
        REFINE_ITEMS[f"image{_i}"] = (_img, _img, _start)
    if not REFINE_ITEMS:
        raise workflow_error("refine: no image to refine (set refine.images or refine.from_sweep with a grid)")
REFINE_TARGETS = [f"{REFINE_DIR}/summary.csv"] if REFINE_ITEMS else []


rule refine_image:
    """One refinement: `python -m nbsim.refine observed=<image> refine=[...] <start overrides>`."""
    input:
        lambda w: REFINE_ITEMS[w.item][1],
    output:
        f"{REFINE_DIR}/{{item}}.folder",
    log:
        f"{LOGS}/refine_image/{REFINE_NAME}/{{item}}.log",
    params:
        args=lambda w: shlex.join([f"observed={REFINE_ITEMS[w.item][0]}",
                                   "refine=[" + ",".join(REFINE.get("keys") or []) + "]",
                                   *REFINE_ITEMS[w.item][2], *(REFINE.get("fit") or [])]),
        store=shlex.quote(STORE),
    threads: config.get("threads", 1)
    resources:
        mem_mb=config.get("mem_mb", 2000),
        runtime=config.get("runtime", 30),
    shell:
        "out=$(OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
        "{PY} -m nbsim.refine {params.args} store.root={params.store} 2> {log}) && "
        "printf '%s\\n' \"$out\" >> {log} && printf '%s\\n' \"$out\" | tail -n 1 > {output}"


rule refine_summary:
    """summary.csv: one row per image with the fitted values, sigmas and starts."""
    input:
        [f"{REFINE_DIR}/{item}.folder" for item in REFINE_ITEMS],
    output:
        csv=f"{REFINE_DIR}/summary.csv",
    params:
        names=list(REFINE_ITEMS),
    threads: 1
    localrule: True
    run:
        folders = [Path(Path(f).read_text().strip()) for f in input]
        _refine.write_refine_summary(params.names, folders, output.csv)
