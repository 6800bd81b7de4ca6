"""The paper's evaluation protocol end to end, in three parts:

- `features`: cached feature extraction through embedding stores (`FeatureExtractor`);
- `runners`: the one-class / unsupervised / group protocol runners and `evaluate`;
- `report`: results.json (`results_dict`), roc.png and scores.png (`write_outputs`), atomic PNGs (`save_figure`).

Settings are `EvalConfig` (`config`).
"""

from dn2_jax.evaluation.config import MODES, PIXELS, QUICK, EvalConfig, applies, validate_config
from dn2_jax.evaluation.features import FeatureExtractor, embed_split
from dn2_jax.evaluation.report import ClassResult, check_output_dir, results_dict, save_figure, write_outputs
from dn2_jax.evaluation.runners import evaluate, one_class_splits, quick_sizes, select_classes

__all__ = ["MODES", "PIXELS", "QUICK", "ClassResult", "EvalConfig", "FeatureExtractor", "applies", "check_output_dir",
           "embed_split", "evaluate", "one_class_splits", "quick_sizes", "results_dict", "save_figure",
           "select_classes", "validate_config", "write_outputs"]
