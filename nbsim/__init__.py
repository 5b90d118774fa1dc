"""nbsim: a differentiable PyTorch re-implementation of the nanoBragg diffraction simulator."""
__version__ = "0.1.0"

from nbsim.spec import (BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec,  # noqa: F401
                        ImageSpec, SpecError)


def simulate(spec, device=None, **kw):
    """Simulate ``spec`` (an ``ExperimentSpec``); see ``nbsim.api.simulate`` (``params=`` for
    derivatives by config name)."""
    from nbsim.api import simulate as _simulate
    return _simulate(spec, device, **kw)


def simulate_many(specs, device=None, **kw):
    """Render a list of ``ExperimentSpec``s in one process, each image bit for bit the image
    ``simulate`` renders alone; see ``nbsim.batch.simulate_many``."""
    from nbsim.batch import simulate_many as _simulate_many
    return _simulate_many(specs, device, **kw)


def compose(overrides=()):
    """``(ExperimentSpec, DeviceSpec)`` composed from Hydra overrides exactly as ``python -m nbsim``
    composes them, e.g. ``compose(["crystal=triclinic", "detector.fpixels=64"])``."""
    from pipeline.compose import compose_spec
    return compose_spec(list(overrides))


__all__ = ["BeamSpec", "CrystalSpec", "DetectorSpec", "DeviceSpec", "ExperimentSpec", "ImageSpec",
           "SpecError", "compose", "simulate", "simulate_many"]
