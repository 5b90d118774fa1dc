"""nbsim's Hydra launcher (``hydra/launcher=nbsim_batch``, the default of ``python -m nbsim``):
every multirun point in this process, through ``pipeline.launcher``."""
