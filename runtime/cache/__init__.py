"""The node's checkpoint cache tiers: SSD and DRAM below the store, composed by
``TieredCache`` (see docs/tiers.md)."""

from runtime.cache.bandwidth import BandwidthEstimator, HopStat
from runtime.cache.dram import DramCache, map_image
from runtime.cache.ssd import SsdCache
from runtime.cache.tiered import FetchResult, TieredCache

__all__ = [
    "BandwidthEstimator",
    "DramCache",
    "FetchResult",
    "HopStat",
    "SsdCache",
    "TieredCache",
    "map_image",
]
