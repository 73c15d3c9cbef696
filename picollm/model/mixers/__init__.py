"""Token mixers: one module per family behind one registry."""
