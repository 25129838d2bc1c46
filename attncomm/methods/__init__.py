"""Circuit discovery methods: ACC tracing (``acc_tracing``) and the edge-attribution baselines."""
