"""The one place where tunepipe reaches into another library's private names or version-specific behaviour.

One module per library (`tunepipe.tasks.patches.unsloth`, `.torch`, `.transformers`, `.prefect`). Each names the
versions its patches were proven on and asks `enabled` before patching anything. With another installed version,
or with `TUNEPIPE_PATCHES=off` (all libraries) or `TUNEPIPE_PATCHES=unsloth,prefect` (those named), the patches
stay off, one warning line says so, and the run goes on through the library's public path, at that path's speed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os

from packaging.specifiers import SpecifierSet
from packaging.version import Version

OFF_SWITCH = "TUNEPIPE_PATCHES"
logger = logging.getLogger("tunepipe.patches")


@functools.cache
def enabled(library: str, proven: str) -> bool:
    """Whether `library`'s patches may run: the installed version satisfies `proven` (a PEP 440 specifier such as
    "==2026.10.5" or ">=2.11,<2.14") and the off switch does not name it. Warns once per library when off."""
    switch = {word.strip().lower() for word in os.environ.get(OFF_SWITCH, "").split(",") if word.strip()}
    if switch & {"off", "0", "false", "none", library.lower()}:
        logger.warning(
            "%s: tunepipe's patches are off (%s=%s); using %s's public path",
            library,
            OFF_SWITCH,
            os.environ[OFF_SWITCH],
            library,
        )
        return False
    try:
        installed = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return False  # nothing to patch
    if not SpecifierSet(proven).contains(Version(installed), prereleases=True):
        logger.warning(
            "%s %s is not a version tunepipe's patches were proven on (%s): they are off, and the run "
            "goes on through %s's public path",
            library,
            installed,
            proven,
            library,
        )
        return False
    return True
