"""``lightning-s2a bench``: S2A against the alternatives, side by side, one process per method."""
