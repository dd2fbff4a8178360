"""Grounded data: synthetic shapes world, WebDataset streaming loader, transforms, phrase alignment."""
