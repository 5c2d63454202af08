"""The library's errors, in one module that imports nothing of the library (so any module can raise them).

Each message names the field or file at fault and the fix; the scripts print it as one line and exit 2.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class BudgetError(ConfigError):
    """The plan is over the configured budget or the GPUs' memory: ``str(err)`` is one line, ``err.table`` the plan."""

    def __init__(self, message: str, table: str = ""):
        super().__init__(message)
        self.table = table


class MergeRefused(RuntimeError):
    """mergekit refused to merge; ``str(err)`` is mergekit's own message."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


class TokenizerFetchError(RuntimeError):
    """A tokenizer could not be fetched or built; the message is one line, meant for a user."""


class RealMemberError(RuntimeError):
    """A real member could not be provisioned (missing package, hash mismatch, failed conversion)."""
