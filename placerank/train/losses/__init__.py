"""Training losses, one module per method, plus shared pieces (:mod:`.mnn`)."""
