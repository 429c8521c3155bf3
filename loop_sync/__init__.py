"""loop-sync: keep a warehouse of Loop lab biomarkers up to date."""

from loop_sync.config import Settings, load_settings
from loop_sync.errors import ConfigError, LoopSyncError

__all__ = ["ConfigError", "LoopSyncError", "Settings", "load_settings"]
