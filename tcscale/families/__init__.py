"""Model families: the one place that knows how a family loads, conditions, grounds and builds its pipeline.

`FAMILIES` maps `model.family` to a `Family` (tcscale.families.base). Adding one: a module with a `Family` subclass
and one `register_family(...)` line below.
"""

from tcscale.families.base import (
    FAMILIES,
    Family,
    check_pipeline_family,
    family_named,
    family_of,
    family_of_pipeline,
    pipeline_class_name,
    pipeline_family,
    register_family,
)
from tcscale.families.layout import BLOCKS, UNET_LAYOUT, Block, DenoiserLayout, UNetLayout, select_layers
from tcscale.families.sd import SDFamily
from tcscale.families.sd3 import SD3Family
from tcscale.families.sdxl import SDXLFamily

register_family(SDFamily())
register_family(SDXLFamily())
register_family(SD3Family())

__all__ = [
    "BLOCKS",
    "Block",
    "DenoiserLayout",
    "FAMILIES",
    "Family",
    "UNET_LAYOUT",
    "UNetLayout",
    "check_pipeline_family",
    "family_named",
    "family_of",
    "family_of_pipeline",
    "pipeline_class_name",
    "pipeline_family",
    "register_family",
    "select_layers",
]
