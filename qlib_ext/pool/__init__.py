"""The task pool over MongoDB: Qlib's TaskManager with leases and fencing, task states, progress and status."""
