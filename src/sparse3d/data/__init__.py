"""Data layer: volume files, importers, sparse annotation, protocols, transforms and tiles.

Import the submodules directly (e.g. ``from sparse3d.data.volume import open_volume``); this package
file stays light so that ``import sparse3d.data`` pulls in nothing heavy.
"""
