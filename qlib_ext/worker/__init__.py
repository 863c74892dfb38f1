"""Workers: the claim-run-commit loop, worker groups, heartbeats, timeouts, the spool, the task body, cache warming."""
