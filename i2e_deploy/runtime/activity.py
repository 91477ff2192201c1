"""Firing rates and synaptic operations (SOPs) counted from the spikes a backend computes.

A conv or linear layer of an MS-ResNet reads only binary spikes, so a dense
multiply-accumulate (MAC) becomes an accumulate that happens only where its input fired:
``SOPs = input firing rate x MACs``, per time step, the usual count of SNN papers. Energy
estimates use 45 nm figures (Horowitz, ISSCC 2014): 0.9 pJ per accumulate for the SNN's
SOPs against 4.6 pJ per multiply-accumulate for the same network computed densely as an
ANN; both depend on the chip, hence the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..model.layers import Layer, layers_from_json

if TYPE_CHECKING:
    from .runners import Runner

ENERGY_AC_PJ = 0.9
ENERGY_MAC_PJ = 4.6


def layer_table_of(runner: Runner) -> list[Layer]:
    """The layer table of the model ``runner`` runs: an exported graph's own (written at
    export, so no PyTorch is needed), else built from the card by the reference model."""
    from ..artifacts import LAYERS_KEY, kind_of, read_metadata

    if kind_of(runner.path) == "onnx":
        stored = read_metadata(runner.path).get(LAYERS_KEY)
        if stored:
            return layers_from_json(stored)
    from ..model.profile import layer_table

    return layer_table(runner.card)


class SpikeReader:
    """``reader(batch) -> (output, {layer: bool [T, N, ...]})``: the spikes the backend
    computes, for every spiking layer of ``table`` it can show.

    The runner's ``infer_spikes`` finds them; added here: the input events of an event-input
    model (under the table's name for them, as the converter's events of an image model are
    under 'i2e'), and a downsampling block's shortcut LIF, which exported graphs run once as
    the block's first LIF (same input, same parameters)."""

    def __init__(self, runner, table: list[Layer]):
        self.runner, self.table = runner, table
        self.wanted = [layer.name for layer in table if layer.kind == "lif"]
        self.events = next((layer.name for layer in table if layer.kind == "events"), "i2e")

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        out, maps = self.runner.infer_spikes(batch)
        for name in list(maps):
            block = name[: -len(".sn1")]
            if name.endswith(".sn1") and f"{block}.downsample.0" in self.wanted:
                maps.setdefault(f"{block}.downsample.0", maps[name])
        if self.runner.card.input == "events":
            maps = {self.events: np.asarray(batch).swapaxes(0, 1) != 0, **maps}
        return out, maps


class ActivityCounter:
    """Spike counts per spiking layer and time step, summed over the batches ``add``ed;
    firing rates, SOPs and energy from them. ``table`` is the model's
    :func:`i2e_deploy.model.profile.layer_table`."""

    def __init__(self, table: list[Layer], T: int):
        self.table, self.T = table, T
        self.spiking = [layer for layer in table if layer.kind in ("events", "lif")]
        self.sizes = {layer.name: int(np.prod(layer.shape)) for layer in self.spiking}
        self.computing = [layer for layer in table if layer.macs]
        self.images = 0
        self.spikes: dict[str, np.ndarray] = {}  # layers the backend exposed: counts [T]

    def counts(self, maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Spikes per layer, time step and image, ``{name: [T, N]}``, of one batch's maps."""
        found = {}
        for layer in self.spiking:
            value = maps.get(layer.name)
            if value is not None:
                found[layer.name] = value.reshape(self.T, value.shape[1], -1).sum(
                    -1, dtype=np.int64
                )
        return found

    def add(self, maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Count one batch; returns its :meth:`counts`."""
        found = self.counts(maps)
        if found:
            self.images += next(iter(found.values())).shape[1]
        for name, value in found.items():
            self.spikes[name] = self.spikes.get(name, 0) + value.sum(1)
        return found

    def per_image(self, counts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each image's overall LIF firing rate and SOPs, from one batch's :meth:`counts`."""
        lif = [layer.name for layer in self.spiking if layer.kind == "lif" and layer.name in counts]
        spikes = sum(counts[name].sum(0) for name in lif)
        neurons = sum(self.sizes[name] for name in lif) * self.T
        sops = sum(
            layer.macs / self.T * (counts[layer.source] / self.sizes[layer.source]).sum(0)
            for layer in self.computing
            if layer.source in counts
        )
        return np.asarray(spikes / max(neurons, 1), float), np.asarray(sops, float)

    def rates(self) -> dict[str, np.ndarray]:
        """Firing rate per time step ``[T]`` of every spiking layer counted."""
        if not self.images:
            return {}
        return {
            name: count / (self.sizes[name] * self.images) for name, count in self.spikes.items()
        }

    def sops(self) -> dict[str, float]:
        """SOPs per image of every conv / linear whose input layer was counted."""
        rates = self.rates()
        return {
            layer.name: float((rates[layer.source] * layer.macs / self.T).sum())
            for layer in self.computing
            if layer.source in rates
        }


@dataclass
class Totals:
    macs: float
    sops: float
    firing_rate: float
    energy_snn_pj: float
    energy_ann_pj: float


def totals(
    table: list[Layer],
    rates: dict[str, np.ndarray],
    sops: dict[str, float],
    *,
    energy_ac: float = ENERGY_AC_PJ,
    energy_mac: float = ENERGY_MAC_PJ,
) -> Totals:
    """Totals per image: MACs, SOPs, the firing rate over all LIF neurons, and the energy of
    the SOPs as accumulates against the MACs as multiply-accumulates."""
    macs = float(sum(layer.macs for layer in table))
    lif = [layer for layer in table if layer.kind == "lif" and layer.name in rates]
    neurons = sum(int(np.prod(layer.shape)) for layer in lif)
    fired = sum(float(rates[layer.name].mean()) * int(np.prod(layer.shape)) for layer in lif)
    total_sops = float(sum(sops.values()))
    return Totals(
        macs=macs,
        sops=total_sops,
        firing_rate=fired / neurons if neurons else 0.0,
        energy_snn_pj=total_sops * energy_ac,
        energy_ann_pj=macs * energy_mac,
    )
