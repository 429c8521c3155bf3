"""Tests of the Prefect flows, deployments.yaml and `loop-sync serve`."""
