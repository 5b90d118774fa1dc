"""nbsim: a differentiable PyTorch re-implementation of the nanoBragg diffraction simulator."""
__version__ = "0.1.0"

from nbsim.spec import (BeamSpec, CrystalSpec, DetectorSpec, DeviceSpec, ExperimentSpec,  # noqa: F401
                        ImageSpec, SpecError)


def simulate(spec, device=None, **kw):
    """Simulate ``spec`` (an ``ExperimentSpec``); see ``nbsim.api.simulate``."""
    from nbsim.api import simulate as _simulate
    return _simulate(spec, device, **kw)

__all__ = ["BeamSpec", "CrystalSpec", "DetectorSpec", "DeviceSpec", "ExperimentSpec", "ImageSpec",
           "SpecError", "simulate"]
