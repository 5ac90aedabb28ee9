"""
The configuration: an INI file (see docs/configuration.md) loaded into frozen, validated objects.
"""

from .errors import ConfigError, ConfigErrors, suggest
from .loader import loadFile, loadString, readText
from .model import BreakerConfig, ClusterConfig, Config, EchoConfig, FilterConfig, HostConfig, ListenerConfig, MeshConfig
from .options import REQUIRED, Options

__all__ = [
    "ConfigError", "ConfigErrors", "suggest", "loadFile", "loadString", "readText", "Options", "REQUIRED",
    "Config", "MeshConfig", "BreakerConfig", "ListenerConfig", "ClusterConfig", "HostConfig", "FilterConfig", "EchoConfig",
]
