"""Refinement: fit detector, beam and crystal parameters of an experiment to observed images.

``nbsim.refine.core``: losses, the scaled parameter vector, the optimiser loop, uncertainties.
``nbsim.refine.observed``: observed images (SMV or raw float32) as photons.
``python -m nbsim.refine``: the Hydra app (``pipeline/refine.py``, config ``conf/refine.yaml``).
"""
