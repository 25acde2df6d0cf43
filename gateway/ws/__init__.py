"""WebSocket side of the gateway: control protocol, sessions, fan-out hub, frames, keepalive, uvicorn protocol."""
