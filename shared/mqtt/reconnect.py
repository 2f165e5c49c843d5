"""paho's client with jittered reconnects: a fleet that lost one broker does not return at once."""

from __future__ import annotations

import random
import time

import paho.mqtt.client as mqtt

_STOPPING = (
    mqtt._ConnectionState.MQTT_CS_DISCONNECTING,
    mqtt._ConnectionState.MQTT_CS_DISCONNECTED,
)


class JitteredClient(mqtt.Client):
    """paho's client with *full jitter* on its capped exponential reconnect backoff.

    paho (2.x) doubles its reconnect delay up to ``reconnect_delay_set``'s maximum but adds
    no jitter, so a fleet that lost the same broker reconnects in lock-step. Overriding the
    (private, but stable through 2.x) ``_reconnect_wait`` hook keeps paho's loop and adds
    a random delay in [delay/2, delay].
    """

    def _reconnect_wait(self) -> None:
        with self._reconnect_delay_mutex:
            if self._reconnect_delay is None:
                self._reconnect_delay = self._reconnect_min_delay
            else:
                self._reconnect_delay = min(self._reconnect_delay * 2, self._reconnect_max_delay)
            delay = self._reconnect_delay * random.uniform(0.5, 1.0)
        end = time.monotonic() + delay
        while not self._thread_terminate and time.monotonic() < end:
            if self._state in _STOPPING:
                return
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
