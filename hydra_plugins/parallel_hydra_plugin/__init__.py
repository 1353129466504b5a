"""Makes parallel_hydra's ``parallel`` config group visible to every Hydra app.

Hydra imports every module under the ``hydra_plugins`` namespace package when an app
starts, so this module must stay cheap: it registers dataclasses and imports no engine.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from parallel_hydra.hydra_config import register_configs

register_configs()


class ParallelHydraSearchPathPlugin(SearchPathPlugin):
    """Registers the ``parallel`` group; it adds no folder to the search path.

    The options live in Hydra's ConfigStore (they are structured configs), which every
    app searches. Being a plugin makes Hydra load this module before it composes.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register_configs()
