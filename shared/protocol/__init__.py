"""The protocol both sides agree on: topics, control messages, frames, signatures."""
