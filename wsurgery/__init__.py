"""wsurgery: Weight Standardization surgery and transfer learning for timm models.

The flow, one module per step::

    load -> convert -> calibrate -> train -> fold -> export / verify

>>> import wsurgery
>>> model = wsurgery.load("resnet18", pretrained=False)
>>> model, report = wsurgery.convert(model, mode="aws", norm="gn")
>>> wsurgery.save(model, "runs/r18-ws")            # doctest: +SKIP
>>> wsurgery.export(model, "export/r18")           # doctest: +SKIP
>>> wsurgery.verify("export/r18", model).passed    # doctest: +SKIP
True
"""

__version__ = "0.1.0"

from .config import SurgeryConfig
from .convert import LayerChange, SurgeryReport, convert, is_converted, pooled_norms
from .errors import WSurgeryError
from .export import ExportResult, export
from .fold import fold
from .load import load, load_checkpoint
from .save import save
from . import io
from .standardize import CONVENTIONS, standardize_weight
from .accumulate import compile_standardization, standardize_once
from .summary import inspect
from .verify import VerifyResult, verify
from .recipes import Recipe, load_recipe
from .datasets import build_datasets
from .train import TrainEvent, TrainResult, train
from .predict import Prediction, predict
from .demo import run_demo
from . import deploy
from .deploy import DeployResult, export_onnx, export_program, find_weight_standardization
from .compare import Agreement, compare
from .calibrate import CalibrationConfig, CalibrationResult, calibrate
from .weights import find_efficientnet_lite_checkpoint, load_efficientnet_lite

__all__ = [
    "__version__",
    "CONVENTIONS",
    "ExportResult",
    "LayerChange",
    "SurgeryConfig",
    "SurgeryReport",
    "VerifyResult",
    "DeployResult",
    "deploy",
    "export_onnx",
    "export_program",
    "find_weight_standardization",
    "WSurgeryError",
    "convert",
    "export",
    "fold",
    "inspect",
    "is_converted",
    "pooled_norms",
    "load",
    "load_checkpoint",
    "save",
    "standardize_weight",
    "standardize_once",
    "compile_standardization",
    "verify",
    "Recipe",
    "load_recipe",
    "build_datasets",
    "TrainEvent",
    "TrainResult",
    "train",
    "Prediction",
    "predict",
    "run_demo",
    "Agreement",
    "CalibrationConfig",
    "CalibrationResult",
    "calibrate",
    "compare",
    "find_efficientnet_lite_checkpoint",
    "load_efficientnet_lite",
]
