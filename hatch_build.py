"""Hatch build hook: ship ``conf/`` inside the installed package as ``lowprec_fl/conf``.

A regular wheel needs the Hydra configs next to the code that composes them
(``lowprec_fl.task.config.CONF_DIR``). An editable install reads ``conf/`` from the checkout
instead: a ``lowprec_fl/conf`` folder in site-packages would shadow the editable package.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ConfigFolderHook(BuildHookInterface):
    """Adds ``conf`` as ``lowprec_fl/conf`` to standard (non-editable) wheels."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Force-include the config folder unless this is an editable build."""
        if version != "editable":
            build_data["force_include"]["conf"] = "lowprec_fl/conf"
