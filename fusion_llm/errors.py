"""The library's errors, in one module that imports nothing of the library (so any module can raise them).

Each message names the field or file at fault and the fix; the scripts print it as one line and exit 2.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class BudgetError(ConfigError):
    """The plan is over the configured budget; the message holds the table."""


class MergeRefused(RuntimeError):
    """mergekit refused to merge; ``str(err)`` is mergekit's own message."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


class TokenizerFetchError(RuntimeError):
    """A tokenizer could not be fetched or built; the message is one line, meant for a user."""


class RealMemberError(RuntimeError):
    """A real member could not be provisioned (missing package, hash mismatch, failed conversion)."""
