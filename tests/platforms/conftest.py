"""Fixtures of the platform tests; each platform keeps its own in ``conftest_<platform>.py``."""

from conftest_formsonfire import fof_sandbox, fof_sandbox_factory  # noqa: F401
from conftest_meiro import meiro_sandbox, meiro_sandbox_factory  # noqa: F401
from conftest_notifyvisitors import nv_choosy_factory, nv_sandbox, nv_sandbox_factory  # noqa: F401
