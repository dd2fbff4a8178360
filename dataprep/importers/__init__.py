"""Importers: existing grounded datasets -> `GroundedRecord`s -> shards (dataprep.writer)."""
