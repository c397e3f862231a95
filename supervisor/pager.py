"""Paging a human: the one message that must get through.

A page is a log event, a metric (`titan_actions_total{kind="page"}`), the journal's `last_page`
meta, and — when `page.webhook_url` is set — a JSON POST retried with exponential backoff off the
event loop (a pager endpoint that blips must not swallow it, and the daemon must not wait on it).
"""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Callable

from tenacity import RetryError, retry, retry_if_exception_type, stop_after_attempt, wait_exponential


class Pager:
    def __init__(self, webhook_url: str, journal, metrics, log, context: Callable[[], dict], *,
                 attempts: int = 5, max_wait_s: float = 8.0, timeout_s: float = 5.0) -> None:
        self.url = webhook_url
        self._journal, self._metrics, self._log = journal, metrics, log
        self._context = context  # run id, state, step, generation at the time of the page
        self.attempts, self.max_wait_s, self.timeout_s = attempts, max_wait_s, timeout_s

    def page(self, reason: str, **extra) -> dict:
        self._metrics.observe_action("page", "sent")
        body = {**self._context(), "reason": reason, **extra}
        self._log.error("page", **body)
        self._journal.set_meta("last_page", body)
        if self.url:
            threading.Thread(target=self.post, args=(self.url, body), daemon=True).start()
        return body

    def post(self, url: str, body: dict, attempts: int | None = None) -> bool:
        """POST `body`, retrying on connection errors and 5xx (1, 2, 4, 8 s). Blocking."""
        n = attempts or self.attempts

        @retry(stop=stop_after_attempt(n), wait=wait_exponential(multiplier=1, max=self.max_wait_s),
               retry=retry_if_exception_type(OSError), reraise=False)
        def send() -> None:
            req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=self.timeout_s).read()

        try:
            send()
            return True
        except RetryError as e:
            self._log.error("page webhook failed", url=url, attempts=n, error=str(e.last_attempt.exception()))
            self._metrics.observe_action("page", "failed")
            return False
