"""The console script `samullm` and the composition root: the only package that wires the gateway,
the runtime and the tools together."""
