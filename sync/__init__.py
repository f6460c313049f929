"""pushsync: keep push-notification platforms in step with CRM exports.

The public surface is deliberately small and pinned by ``tests/test_public_api.py``.
"""

from sync.errors import (
    BadInputError,
    BadJobError,
    ExitCode,
    FatalPlatformError,
    PlatformError,
    PushSyncError,
    RejectedBatchError,
    RetryableError,
    SecretError,
    StateError,
)
from sync.records import Batch, BatchResult, BatchStatus, Operation, Phase, RejectedRow, RowRef

# The platform registry installs itself as the catalogue sync.config.load_job checks jobs against (the
# configuration layer imports nothing from the platforms): every import of the package gets it.
import sync.platforms.registry  # noqa: F401  isort: skip

__version__ = "0.1.0"

__all__ = [
    "BadInputError",
    "BadJobError",
    "Batch",
    "BatchResult",
    "BatchStatus",
    "ExitCode",
    "FatalPlatformError",
    "Operation",
    "Phase",
    "PlatformError",
    "PushSyncError",
    "RejectedBatchError",
    "RejectedRow",
    "RetryableError",
    "RowRef",
    "SecretError",
    "StateError",
    "__version__",
]
