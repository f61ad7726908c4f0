"""Running the server: the settings and uvicorn (serve.py) or Ray Serve (ray_app.py), the app and its route table
(app.py), the server's own handlers (routes.py: pages, probes, stats, the WebSocket doors' admission), and its life
(lifecycle.py: load, engine watch, drain, the sweep of resumable generations)."""
