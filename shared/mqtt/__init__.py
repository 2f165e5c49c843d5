"""MQTT: the transport seam, the paho-mqtt client behind it, chunking, connect errors."""
