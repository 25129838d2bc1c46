"""Shipped model organisms: small trained models whose circuits are known.

Each ``attncomm/toys/<name>/`` is an ordinary local HF-format directory (``model.safetensors``,
``config.json``, tokenizer files) plus ``training_config.json``, ``metrics.json`` and
``reference_circuit.json``. Load one with ``model=toy-induction`` / ``model=toy-ioi`` (their model
yaml points ``model.path`` at this package through ``${attncomm_pkg:toys/<name>}``). Rebuild with
``python run.py stage=train model=<name>`` and ``python -m attncomm.toys.reference <name>``.
"""
