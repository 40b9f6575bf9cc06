"""Only for the optional C masking module; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and
wstunnel masks in pure Python (wstunnel/ws/masking.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("wstunnel.ws._speedups", ["wstunnel/ws/_speedups.c"], optional=True),
    ],
)
