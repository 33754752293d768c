"""Fuzz targets for every parser of peer input, and their runner (``python -m fuzz.run``).

Outside the ``whepfan`` package on purpose: nothing here ships, and atheris is an
optional extra (``pip install -e .[fuzz]``). See ``fuzz/README.md``.
"""
