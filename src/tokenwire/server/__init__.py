"""The server: WebSocket protocol, HTTP routes, limits. Imports no torch; talks to the engine interface."""
