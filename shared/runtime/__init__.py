"""The torch runtime: models, local training, parameter I/O and on-device data loading."""
