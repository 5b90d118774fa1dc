"""The top-level names the README's Python snippets use (``nbsim.simulate_many``, ``nbsim.compose``)."""
import nbsim


def test_top_level_simulate_many_renders_each_spec_as_simulate_does():
    """``nbsim.simulate_many`` (README, Workflows: in one process) exists and gives, for each spec,
    exactly the image ``nbsim.simulate`` renders alone (max |diff| == 0)."""
    specs, device = [], None
    for n in (3, 4):
        spec, device = nbsim.compose(["detector.fpixels=16", "detector.spixels=16", f"crystal.N={n}",
                                      "device.compile=false"])
        specs.append(spec)
    many = nbsim.simulate_many(specs, device)
    assert len(many) == 2
    for spec, r in zip(specs, many):
        alone = nbsim.simulate(spec, device).image
        assert r.image.shape == (16, 16) and float(alone.abs().max()) > 0
        assert float((r.image - alone).abs().max()) == 0.0
    assert float((many[0].image - many[1].image).abs().max()) > 0      # the two specs differ
