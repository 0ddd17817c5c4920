"""equireg: image registration with a network equivariant to independent translations of the
fixed and the moving image. ``register`` is the entry point; ``equireg`` the command.

``register`` and ``Result`` are imported on first use so that ``import equireg`` (and the
command's ``--help``) stays fast.
"""

from typing import Any

from .errors import InputError, RegistrationFailure

__version__ = "0.1.0"
__all__ = ["InputError", "RegistrationFailure", "Result", "__version__", "register"]


def __getattr__(name: str) -> Any:
    if name in ("register", "Result"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'equireg' has no attribute {name!r}")
