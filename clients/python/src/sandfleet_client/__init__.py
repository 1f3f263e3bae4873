"""sandfleet client: enqueue sandbox tasks, follow their results, drive sessions.

Speaks version 1 of the message contract (schemas/*.v1.schema.json)."""

from .fleet import (
    CANCELLATION_MESSAGE_TYPE,
    CancelError,
    CancelStatus,
    RESULT_MESSAGE_TYPE,
    SCHEMA_VERSION,
    TASK_MESSAGE_TYPE,
    Dedup,
    EnqueueError,
    Fleet,
    Received,
    StartAt,
    Subscription,
    SubscriptionLost,
    new_task,
    uuid7,
)
from .models.cancellation import Cancellation
from .models.result import TaskResult
from .models.task import Task
from .sessions import CommandResult, Sandbox, SessionInfo, SessionsClient, SessionsError

__version__ = "1.0.0"

__all__ = [
    "CANCELLATION_MESSAGE_TYPE",
    "CancelError",
    "CancelStatus",
    "Cancellation",
    "RESULT_MESSAGE_TYPE",
    "SCHEMA_VERSION",
    "TASK_MESSAGE_TYPE",
    "CommandResult",
    "Dedup",
    "EnqueueError",
    "Fleet",
    "Received",
    "Sandbox",
    "SessionInfo",
    "SessionsClient",
    "SessionsError",
    "StartAt",
    "Subscription",
    "SubscriptionLost",
    "Task",
    "TaskResult",
    "new_task",
    "uuid7",
]
