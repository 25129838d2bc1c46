"""Artifact I/O: run directories and manifests, tracing results, the Omega store, graph files, circuits data."""
