"""The protocol package both sides share: protocol, compression, MQTT, torch runtime."""
