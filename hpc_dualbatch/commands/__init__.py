"""The commands that are not a layer's own (`train`, `profile`, `report`, `info`); each
module has `register(subparsers)` (see cli.py).
"""
