"""Memory planning: will a config fit, at which micro-batch (``python -m tcscale.memory``; docs/MEMORY.md)."""

from tcscale.memory.planner import MemoryPlan, PlanError, plan_memory
from tcscale.memory.preflight import MemoryPreflightError, preflight_memory

__all__ = ["MemoryPlan", "MemoryPreflightError", "PlanError", "plan_memory", "preflight_memory"]
