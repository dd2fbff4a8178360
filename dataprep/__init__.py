"""Grounded-data pipeline: stages produce `GroundedRecord`s, `dataprep.writer` writes WebDataset shards."""

from dataprep.record import GroundedRecord, RecordError

__all__ = ["GroundedRecord", "RecordError"]
