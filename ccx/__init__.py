"""ccx: run long-lived command-line agents behind a WebSocket JSON-RPC 2.0 API.

Inputs/outputs: see `ccx.server` (the service), `ccx.client` (a trio client) and `ccx.cli`.
Docs: ../shared/PROTOCOL.md (the wire contract), README.md.
"""

__version__ = "0.1.0"
