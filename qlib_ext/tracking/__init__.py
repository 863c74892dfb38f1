"""MLflow: experiment set-up, the reaper of ghost runs, the leaderboard, the MLflow server."""
