"""One module per tab; each has `build(ctx)`."""
