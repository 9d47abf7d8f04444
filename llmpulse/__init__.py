"""Composition root: the CLI and the runtime wiring. Everything it wires lives in
``schemas/``, ``ingest/``, ``processors/`` and ``sinks/``."""

__version__ = "0.1.0"
