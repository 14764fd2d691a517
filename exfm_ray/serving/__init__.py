"""Serving students over HTTP: Ray Serve router (multiplexed, batched, hot-reloaded) and a reference path.

Import `exfm_ray.serving.app` for the Serve application; this package itself imports no Ray.
"""
