"""Dataprep stages: caption choice (CLIP), noun phrases (flair POS), grounding (Grounding DINO + SAM-HQ)."""
