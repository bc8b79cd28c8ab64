"""How loud third-party libraries are: transformers' warnings and progress bars stay off unless asked for."""

from __future__ import annotations


def quiet_third_party_logs(verbose: bool) -> None:
    """Silence transformers' logs and progress bars (what a visprune command prints is its own)."""
    if verbose:
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
