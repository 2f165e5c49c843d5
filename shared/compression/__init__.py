"""Value codecs for tensors (dense, top-k, low-rank), their registry and error feedback.

Pure numpy: no MQTT, no torch.
"""
