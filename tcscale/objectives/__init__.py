"""Training objectives: TokenCompose (LDM + grounding), LDM-only, Separate-and-Enhance."""
