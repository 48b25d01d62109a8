"""ClusterFit pseudo labels: a tool beside the methods, not a recipe (AdvCL reads its files).

kmeans.py   seeded torch k-means (k-means++ init) and scikit-learn's, one result type
files.py    the labels file + JSON sidecar (the cache key) and the official AdvCL pickle
generate.py encoder (or raw-pixel) features -> k-means per K -> a labels file, cached by encoder hash
cli.py      ``python -m advfast.pseudo_labels --encoder RUN_DIR --dataset cifar10 --out FILE``
"""

from advfast.pseudo_labels.files import (DEFAULT_KS, FORMAT, generator_command, load_pseudo_labels, read_meta,
                                         read_official_pickle, save_pseudo_labels, sidecar_path)
from advfast.pseudo_labels.generate import build_pseudo_labels, encoder_features, load_encoder, raw_pixel_features
from advfast.pseudo_labels.kmeans import KMeansResult, kmeans, kmeans_sklearn

__all__ = ["DEFAULT_KS", "FORMAT", "KMeansResult", "build_pseudo_labels", "encoder_features", "generator_command",
           "kmeans", "kmeans_sklearn", "load_encoder", "load_pseudo_labels", "raw_pixel_features", "read_meta",
           "read_official_pickle", "save_pseudo_labels", "sidecar_path"]
