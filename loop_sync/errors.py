"""Errors a loop-sync user must act on. Each message says what to do.

LoopSyncError
└── ConfigError      a setting is missing, malformed or points nowhere: fix it and re-run
"""

from __future__ import annotations


class LoopSyncError(Exception):
    """Base of every error loop-sync raises on purpose."""


class ConfigError(LoopSyncError):
    """The configuration cannot work. The message names the variable and the fix."""
