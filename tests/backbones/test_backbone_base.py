"""The Backbone interface: what a new backbone must give is checked when it is made, not deep in a fit."""

from __future__ import annotations

import pytest

from adaptive_mllm.backbones import Backbone


def test_a_backbone_without_parameter_groups_is_refused_when_made():
    # configure_model reads parameter_groups (freeze, per-part learning rates): a backbone written without it used
    # to be made, then fail there with a bare NotImplementedError
    others = {name: (lambda self, *args: None) for name in Backbone.__abstractmethods__ if name != "parameter_groups"}
    incomplete = type("Incomplete", (Backbone,), others)
    with pytest.raises(TypeError, match="parameter_groups"):
        incomplete()
    complete = type("Complete", (incomplete,), {"parameter_groups": lambda self: {}})
    assert complete().parameter_groups() == {}
