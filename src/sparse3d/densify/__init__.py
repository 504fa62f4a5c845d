"""densify: the paper's semi-automated use case, one volume and a few annotated planes in, a dense
segmentation out (``python -m sparse3d.densify``).

One module per job:

- :mod:`~sparse3d.densify.command`: the Hydra entry point (layer 3) and the paper's network
  (``method=unet``);
- :mod:`~sparse3d.densify.inputs`: the inputs, their checks and import (layer 3);
- :mod:`~sparse3d.densify.methods`: config -> the per-volume methods ``rf`` and ``refine`` (layer 3);
- :mod:`~sparse3d.densify.features`: filter features of a block (layer 1);
- :mod:`~sparse3d.densify.forests`: the random forest, cross-fitted and stacked (layer 1);
- :mod:`~sparse3d.densify.network`: the refining network's pseudo-labels, tiles and prediction
  (layer 1), trained by :mod:`~sparse3d.densify.network_fit` (layer 2, Lightning);
- :mod:`~sparse3d.densify.results`: result files, pictures and scores (layer 3).
"""
