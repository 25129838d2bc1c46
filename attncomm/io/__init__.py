"""Artifact I/O: run directories, manifests, tracing results, the Omega store, graph files, circuits data."""
