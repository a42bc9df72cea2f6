"""The web console's static files (package data), served by `ccx.transport.ui`."""
