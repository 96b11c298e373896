"""From detector output to a delivered notification: the detector runner (caught up from the
store), alert rows (one page per incident), the transactional outbox, the delivery thread, webhook
endpoints and their signatures, the native, Slack and Alertmanager formats, SSRF-checked targets."""

from .alerts import AlertStore
from .detection import DetectorRunner
from .dispatcher import DEFAULT_SCHEDULE, WebhookDispatcher
from .outbox import Outbox

__all__ = ["DEFAULT_SCHEDULE", "AlertStore", "DetectorRunner", "Outbox", "WebhookDispatcher"]
