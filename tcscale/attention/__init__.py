"""Grounded cross-attention: the plan (which layers, which mask rule), the processors, the recorders, the reference."""
