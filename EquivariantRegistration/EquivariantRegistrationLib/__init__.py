"""The Slicer module's Qt-free layer: it drives ``equireg register`` and moves data between
MRML nodes and the engine's files. Testable in pytest with PyPI ``slicer-core``."""
