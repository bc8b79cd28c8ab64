"""Named user-facing errors. Every one carries a `Hint:` that says what to do next.

The CLI maps each class to its exit code and prints only `str(error)` unless `--verbose`.
"""

from __future__ import annotations


class VispruneError(Exception):
    """Base of all errors a user can fix; `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nHint: {self.hint}"

    def __reduce__(self):  # picklable with both arguments, so errors cross process boundaries intact
        return type(self), (self.message, self.hint)


class ConfigError(VispruneError):
    """A stage config or CLI value is out of range."""

    exit_code = 2


class ModelLoadError(VispruneError):
    """A model reference does not resolve to a readable LLaVA checkpoint."""

    exit_code = 3


class InputDataError(VispruneError):
    """User data (images, prompts, data files) cannot be used as given."""

    exit_code = 4


class ImageLoadError(InputDataError):
    """An image file is missing or does not decode."""


class PromptError(InputDataError):
    """A prompt does not have exactly one `<image>` placeholder, or does not fit the model."""


class CalibrationDataError(InputDataError):
    """The calibration set file is malformed."""


class RecipeError(VispruneError):
    """A recipe is malformed or does not fit the model it is used with."""

    exit_code = 5


class BudgetUnreachableError(VispruneError):
    """No pruning strength meets the requested FLOPs reduction."""

    exit_code = 6


class ExportError(VispruneError):
    """The exported graphs are not fit for deployment (e.g. the TensorRT-readiness lint failed)."""

    exit_code = 7


class ArtifactMismatchError(VispruneError):
    """An artifact does not match the model, recipe or upstream artifact it is used with, or is incomplete."""

    exit_code = 8


class BackendUnavailableError(VispruneError):
    """A backend (TensorRT, CUDA, an ONNX Runtime provider) is not installed or has no device here."""

    exit_code = 10


class EngineBuildError(VispruneError):
    """An engine builder rejected the graphs or ran out of memory."""

    exit_code = 11
