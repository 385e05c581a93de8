"""The library the stages and workflows import, one package per concern: ``core``, ``lm``, ``contract``,
``search``, ``analysis`` and ``judge`` (each package's docstring says what it owns and which of the others it may
import; docs/architecture.md shows them together). ``shared/data/`` is package data, not code."""
