"""Task states as stored in the pool: plain strings, so Qlib's own tools keep reading them."""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    """Status of a task document. The first four are Qlib's ``TaskManager`` states; the rest are ours:
    ``pruned`` is a rolling window a search's pruner dropped before it was ever queued."""

    WAITING = "waiting"
    RUNNING = "running"
    PART_DONE = "part_done"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"


UNFINISHED = (TaskStatus.WAITING.value, TaskStatus.RUNNING.value, TaskStatus.PART_DONE.value)
"""States in which a task still has work ahead of it."""

ADOPTABLE = (TaskStatus.WAITING.value, TaskStatus.PART_DONE.value, TaskStatus.FAILED.value)
"""States in which lease recovery leaves a task it took back: a late commit of that same attempt is still accepted
(``GridTaskManager.commit``) if nobody claimed the task since."""


class Trainer(StrEnum):
    """Which of Qlib's trainers a worker stands in for on a pool Qlib made (``qlib-ext worker --trainer``): what
    its ``worker()`` claims, and which states keep it waiting for more. Pools qlib-ext submitted are ``rm``'s."""

    RM = "rm"  # TrainerRM.worker(): waiting -> done, running Qlib's task_train
    DELAY = "delay"  # DelayTrainerRM.worker(): part_done -> done, end_task_train in the run begin_task_train made

    @property
    def claims(self) -> str:
        """The state this trainer's worker claims tasks from."""
        return TaskStatus.PART_DONE.value if self is Trainer.DELAY else TaskStatus.WAITING.value

    @property
    def pending(self) -> tuple[str, ...]:
        """States that keep its worker waiting: ``rm`` leaves ``part_done`` to ``delay``; ``delay`` waits for
        ``waiting`` tasks too, which the submitter's ``DelayTrainerRM.train`` turns ``part_done`` itself."""
        return UNFINISHED if self is Trainer.DELAY else (TaskStatus.WAITING.value, TaskStatus.RUNNING.value)


class RunStatus(StrEnum):
    """Status of an attempt's MLflow run (MLflow's own names). The worker that owns the attempt ends it:
    FINISHED only once its result is committed in the pool, KILLED when it was interrupted or its commit
    refused, FAILED once its failure is recorded; the reaper ends the runs of workers that died."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


class EndReason(StrEnum):
    """Why an attempt ended without its result committed: the error entry of a task handed back, the
    ``qlib_ext.discarded`` tag of a run ended KILLED, and what a task runner's interrupt carries."""

    LEASE_LOST = "lease lost"  # the heartbeat found the task no longer ours (reclaimed, cancelled, reset)
    WORKER_STOPPED = "worker stopped"  # SIGTERM/Ctrl-C and the grace period is over
    TERMINATED = "terminated by the worker"  # a task child got SIGTERM from its worker
    INTERRUPTED = "interrupted"  # an interrupt without a recorded reason
    LOST_BEFORE_FOLLOW_UP = "lease lost before its backtests were queued"
    LOST_BEFORE_COMMIT = "lease lost before commit"  # the fenced commit was refused
    STORE_AWAY = "store unreachable before commit"  # the store failed between the run and the commit
    SPOOL_REFUSED = "spooled result refused: task taken over"  # a replayed spool's commit was refused
    ATTEMPT_OVER = "its attempt is over"  # reaper: a RUNNING run whose worker died or lost the task
    TIMED_OUT = "task timed out"  # the task child was killed at its deadline
