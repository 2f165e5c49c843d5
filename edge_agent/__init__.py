"""The device agent: local training, updates, outbox, inference (``fedmq-agent``)."""
