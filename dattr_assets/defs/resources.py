"""Resources: the project settings file and the storage root, shared by every asset."""


from pathlib import Path

from dagster import ConfigurableResource

from dattr_core.config import Settings, load_settings
from dattr_core.store import dattr_home


class DattrResource(ConfigurableResource):
    """Where data lives (`DATTR_HOME`) and what to run (`dattr.yaml`)."""

    config_path: str = ""  # empty: $DATTR_CONFIG or ./dattr.yaml
    home: str = ""  # empty: $DATTR_HOME or ./dattr_data

    @property
    def root(self) -> Path:
        return dattr_home(self.home or None)

    def settings(self) -> Settings:
        return load_settings(self.config_path or None)
