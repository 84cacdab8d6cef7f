"""A gate site: one prunable width (or one skippable module) of a UNet."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateSite:
    """One place in the UNet that a group of gates controls.

    `name` is the qualified module name (``unet.get_submodule(name)``), `kind` the registered gate
    kind, `unit_sizes` the number of channels each gate controls (one entry per gate; a depth
    gate controls the whole module and has one unit of size 1), and `offset` the position of the
    site's first gate in the flat gate vector of its layout.
    """

    name: str
    kind: str
    unit_sizes: tuple[int, ...]
    offset: int = 0

    @property
    def num_units(self) -> int:
        return len(self.unit_sizes)

    @property
    def channels(self) -> int:
        return sum(self.unit_sizes)

    def unit_channel_ranges(self) -> list[range]:
        """Channels of each unit: consecutive, in unit order."""
        ranges, start = [], 0
        for size in self.unit_sizes:
            ranges.append(range(start, start + size))
            start += size
        return ranges

    def kept_channels(self, kept_units: list[int]) -> list[int]:
        ranges = self.unit_channel_ranges()
        return [c for u in sorted(kept_units) for c in ranges[u]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unit_sizes"] = list(self.unit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GateSite":
        return cls(name=d["name"], kind=d["kind"], unit_sizes=tuple(int(s) for s in d["unit_sizes"]), offset=int(d["offset"]))


def split_evenly(total: int, parts: int) -> tuple[int, ...]:
    """Sizes of `parts` nearly equal consecutive groups covering `total` units (larger groups first)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))
