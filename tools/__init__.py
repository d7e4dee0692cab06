"""Offline tools around the server (not the serving path): checkpoint conversion and reports."""
