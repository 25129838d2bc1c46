"""Toolkit analyses: direct logit attribution, logit lens, patching, head detection, QK/OV circuits."""
