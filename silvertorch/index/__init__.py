"""The index-as-model primitives (torch only; Triton optional, on CUDA)."""

from .attributes import Attribute, ItemAttributes
from .ivf import IVFIndex
from .kmeans import KMeansConfig, kmeans
from .layout import SLOT_ALIGN
from .search import ItemIndex, SearchParams, SearchStats

__all__ = [
    "Attribute",
    "ItemAttributes",
    "IVFIndex",
    "ItemIndex",
    "KMeansConfig",
    "SLOT_ALIGN",
    "SearchParams",
    "SearchStats",
    "kmeans",
]
