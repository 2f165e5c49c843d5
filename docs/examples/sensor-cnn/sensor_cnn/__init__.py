"""fedmq sensor example: a 1-D CNN model plugin and the example that runs it."""
