"""Contract tests of the sandbox Loop platform, over real HTTP on loopback."""
