"""Tools around the nbsim engine: the Hydra app, the result store, and comparison tooling.

The Hydra app (``python -m nbsim``) is made of one-job modules:

compose  -- Hydra config -> validated (ExperimentSpec, DeviceSpec); one-line config errors
hashing  -- the config hash that names a stored result
store    -- run_or_reuse: outputs/<hash>/ written atomically, reused when present
preview  -- preview PNG of a float image
app      -- the @hydra.main entry point
"""
