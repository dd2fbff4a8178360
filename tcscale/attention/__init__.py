"""Cross-attention processors that expose grounding losses, and mask resizing."""
