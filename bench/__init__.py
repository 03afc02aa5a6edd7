"""Benchmarks of activator side by side with systemd-socket-activate, tcpserver and xinetd.

Run ``python -m bench`` (full, about 5-10 minutes), ``python -m bench --quick`` or
``python -m bench --smoke`` (seconds; what CI runs). See bench/run.py.
"""
