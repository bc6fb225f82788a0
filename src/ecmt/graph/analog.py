"""The encoding layer: a weighted layer on the analog input (patch or token embedding)."""
from __future__ import annotations

from torch import Tensor, nn

from ..registry import register_analog_input


class AnalogLayer(nn.Module):
    """A weighted layer that reads the analog input, as in the ANN, at every step.

    It is a module only so that its MACs are counted (``mac_analog`` in :mod:`ecmt.energy`).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


register_analog_input(AnalogLayer)
