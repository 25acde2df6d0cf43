"""The gateway process: broker -> relay -> hub -> session -> client socket, plus the REST and ops endpoints."""
