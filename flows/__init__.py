"""loop-sync's Prefect flows: thin wrappers (parameters, tasks, retries, artifacts) around
`loop_sync`. `deployments.yaml` points at these files; `docs/orchestration.md` explains them.
"""
