"""A local stand-in for the Loop platform, faithful to docs/loop-contract.md, with knobs."""

from loop_sync.sandbox.app import Sandbox, SandboxClient, SandboxConfig
from loop_sync.sandbox.knobs import Knobs
from loop_sync.sandbox.server import SandboxHost, running_sandbox

__all__ = ["Knobs", "Sandbox", "SandboxClient", "SandboxConfig", "SandboxHost", "running_sandbox"]
