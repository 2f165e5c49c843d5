"""The operator's tools: the ``fedmq`` command (demo, benchmarks, report, monitor, export,
provisioning). They alone may import both the service and the device agent; nothing imports
them.
"""
