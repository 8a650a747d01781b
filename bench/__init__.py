"""Benchmarks of s3proxy; run them with ``python -m bench`` (see ``bench/__main__.py``)."""
