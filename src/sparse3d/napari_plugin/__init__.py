"""sparse3d in napari (layer 3), registered through the ``napari.manifest`` entry point
(``napari.yaml`` beside this file):

- the "Densify" dock widget (:mod:`.widget`): paint a few planes on a Labels layer, Run, see the
  dense result as ``<image> densified``, correct, repeat; it points to the plane to paint next;
- a reader (:mod:`.reader`) for sparse3d HDF5 volumes and densify results (HDF5, TIFF,
  OME-Zarr).

The widget's input handling without Qt is in :mod:`.layers`. Importing this package imports
neither napari nor Qt.
"""
