"""Figures and viewers: matplotlib plots and the Cytoscape export with its HTML viewer."""
