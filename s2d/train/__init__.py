"""Making models: SoFT training of a sorted draft, the bundled demo family, tiny test models, and
checkpoint conversion."""
