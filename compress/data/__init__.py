"""compress.data: the data the models are trained, calibrated and checked on.

- ``datasets``: the built-in demo dataset (scikit-learn's handwritten digits placed on a 64x64 canvas), image
  folders, the training loaders (sharded for distributed runs) and mixup;
- ``images``: image *sources* as the commands name them (a folder, a ``.npy``/``.npz`` file, ``demo``) turned
  into preprocessed float32 arrays, for calibration, validation and the keep-ratio sweep.
"""
