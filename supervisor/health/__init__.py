"""Health: failure diagnosis, hang detection, stack capture, loss anomalies, the GPU monitor.

See docs/health.md. Modules are imported one by one (nothing here), so the daemon
pays only for what it uses.
"""
