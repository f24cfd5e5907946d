"""How the worker quiets the libraries it drives."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Loading bars and advice meant for notebooks would drown the service's own logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
